import pytest

TINY = {"dim": 32, "heads": 2, "enc_layers": 3, "dec_layers": 3, "img_size": 32, "patch_size": 8,
        "max_text_len": 12, "max_gen_len": 18}


def _recipe(tasks, steps=40):
    return {"name": "tiny-mue", "method": {"name": "mue", **TINY, "tasks": tasks},
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
