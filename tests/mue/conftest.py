import pytest

TINY = {"dim": 32, "heads": 2, "enc_layers": 3, "dec_layers": 3, "img_size": 32, "patch_size": 8,
        "max_text_len": 12, "max_gen_len": 18, "dec_prompt": True}


def _recipe(tasks, steps=40, **method):
    return {"name": "tiny-mue", "method": {"name": "mue", **TINY, "tasks": tasks, **method},
            "data": {"spec": "synthetic-vl", "n_train": 160, "n_val": 16, "n_test": 24},
            "train": {"steps": steps, "batch_size": 32, "eval_every": 1000, "threads": 1}}


@pytest.fixture(scope="session")
def mue_run(tmp_path_factory):
    from deploykit.methods.mue.train import train_mue

    return train_mue(_recipe(["entailment", "caption"]), tmp_path_factory.mktemp("mue") / "run")


@pytest.fixture(scope="session")
def mue_engine(mue_run, tmp_path_factory):
    from deploykit.export.mue import export_mue

    out = tmp_path_factory.mktemp("mue") / "engine"
    manifest = export_mue(mue_run, out, n_check=24)
    return out, manifest


@pytest.fixture(scope="session")
def ve_only_engine(tmp_path_factory):
    from deploykit.export.mue import export_mue
    from deploykit.methods.mue.train import train_mue

    root = tmp_path_factory.mktemp("mue-ve")
    run = train_mue(_recipe(["entailment"], steps=5), root / "run")
    return export_mue(run, root / "engine", check=False).root


@pytest.fixture(scope="session")
def legacy_engine(tmp_path_factory):
    """An engine of the old design (entailment decoder from <bos> alone), as exported before ``dec_prompt`` existed:
    no ``dec_prompt`` key in the run's config nor in the manifest."""
    import json

    from deploykit.export.mue import export_mue
    from deploykit.manifest import Manifest
    from deploykit.methods.mue.train import train_mue

    root = tmp_path_factory.mktemp("mue-legacy")
    run = train_mue(_recipe(["entailment", "caption"], steps=5, dec_prompt=False), root / "run")
    cfg = json.loads((run / "config.json").read_text())
    del cfg["method"]["dec_prompt"]
    (run / "config.json").write_text(json.dumps(cfg))
    out = root / "engine"
    export_mue(run, out, n_check=12)
    m = Manifest.load(out)
    del m.extra["mue"]["dec_prompt"]
    m.save()
    return run, out
