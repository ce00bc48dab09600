"""``diffusekit fid`` against a hostile user: options checked before any feature runs, one-line errors."""

from __future__ import annotations

import pytest
import torch

from diffusekit.cli.main import main
from diffusekit.io.images import save_images


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fid")

    class Features(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 3, 299, 299) -> (N, 4)
            return torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)[:, :4]

    torch.jit.script(Features()).save(str(root / "feat.pt"))
    g = torch.Generator().manual_seed(0)
    save_images(torch.rand(6, 3, 8, 8, generator=g), root / "a")
    save_images(torch.rand(6, 3, 8, 8, generator=g), root / "b")
    return root


def cli(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr()


def fid(root, *extra):
    return ["fid", str(root / "a"), str(root / "b"), "--inception", str(root / "feat.pt"), "--device", "cpu",
            "--no-cache", *extra]  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--batch-size", "0"], "--batch-size must be an integer in [1, 4096], got 0"),
        (["--batch-size", "-1"], "--batch-size must be an integer in [1, 4096], got -1"),
        (["--limit", "-1"], "--limit must be an integer in [2, "),
        (["--save-stats", "."], "--save-stats .: is a folder"),
        (["--save-stats", "stats.txt"], "--save-stats stats.txt: the file name must end in .npz"),
    ],
)
def test_bad_options_are_one_line_errors(setup, capsys, extra, needle):
    code, out = cli(fid(setup, *extra), capsys)
    assert code == 2 and out.err.startswith("diffusekit fid: error: ") and needle in out.err, out.err
    assert len(out.err.splitlines()) == 1


def test_save_stats_into_a_new_folder(setup, tmp_path, capsys):
    code, out = cli(fid(setup, "--save-stats", str(tmp_path / "s" / "a.npz")), capsys)
    assert code == 0, out.err
    assert out.out.startswith("FID ")
    assert (tmp_path / "s" / "a.npz").is_file()


def test_a_read_only_cache_is_a_warning_not_a_failure(setup, tmp_path, monkeypatch, capsys):
    import diffusekit.evaluation.fid as fid_math
    from diffusekit.errors import OutputError

    def read_only(self, path, **info):
        raise OutputError(f"{path}: could not write the statistics (Read-only file system)")

    monkeypatch.setenv("DIFFUSEKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fid_math.FeatureStats, "save", read_only)
    argv = [a for a in fid(setup) if a != "--no-cache"]
    with pytest.warns(UserWarning, match="feature statistics not cached"):
        code, out = cli(argv, capsys)
    assert code == 0 and out.out.startswith("FID "), out.err
