"""``diffusekit serve --engine``: recorded in every PNG's provenance as txt2img records it; unknown names refused."""

from __future__ import annotations

import pytest
from serving import MODEL, tiny_model

from diffusekit.cli.main import main
from diffusekit.serve.service import Service, Settings


def test_the_engine_is_recorded_in_the_provenance_of_the_servers_images(tmp_path):
    sd = tiny_model()
    assert Service(sd, Settings(model=str(MODEL), out=tmp_path, engine="openvino")).worker.provenance["engine"] == (
        "openvino"
    )
    assert "engine" not in Service(sd, Settings(model=str(MODEL), out=tmp_path)).worker.provenance


def test_serve_refuses_an_unknown_engine_by_name(capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", str(MODEL), "--engine", "tensorrt"])
    assert e.value.code == 2 and "--engine" in capsys.readouterr().err
