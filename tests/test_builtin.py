"""Built-in providers: looked up by name, built reproducibly, cached and checked."""

import hashlib
import random
import subprocess
import sys
import time

import pytest
import torch

from rlflow import Eval, Generate, Loss, Model, Pipeline, Prompts, Score, builtin, models
from rlflow.arith import exact_match, signed_match
from rlflow.data import check_source
from rlflow.models import ModelLoadError, check_path, resolve
from rlflow.spec import Demonstrations

# sha256 of model.safetensors of builtin:tiny-arith-init (torch 2.13, transformers 5.x).
# If a library upgrade changes it, the cache key must change too: bump arith._INIT_REVISION.
INIT_SHA256 = "0d12acf6d053a53412e2b6cec4ad386df103372509de34e82e7282d9c9746f48"
# ... and of builtin:tiny-arith, the SFT of it (pipelines/sft.py, built in one thread). It
# changed (1fa55a6d... -> 7129d4e9...) with the packed forwards and the fused AdamW, which
# order the same float operations differently: held-out accuracy 27.0 % -> 38.0 %.
TINY_ARITH_SHA256 = "7129d4e9e8ebd074bfa5529211736878270c390d1ec078cc72331f563ba1fca3"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RLFLOW_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pipeline(**kw):
    base = dict(name="t", data=Prompts("builtin:arith"), models={"actor": Model("builtin:tiny-arith", train=True)},
                nodes=[Generate("actor", n=2), Score(rule=signed_match), Loss("clip", model="actor")])
    return Pipeline(**{**base, **kw})


def test_shipped_providers_are_registered_by_name():
    assert builtin.known_data() == ["builtin:arith", "builtin:arith-chain"]
    assert builtin.known_models() == ["builtin:tiny-arith", "builtin:tiny-arith-chain", "builtin:tiny-arith-chain-init",
                                      "builtin:tiny-arith-init"]
    assert builtin.data_provider("builtin:arith").rule is exact_match


def test_unknown_names_list_the_known_ones_and_the_closest():
    why = check_path("builtin:tiny-arth")
    assert "known: builtin:tiny-arith, builtin:tiny-arith-chain" in why and "Did you mean 'builtin:tiny-arith'?" in why
    why = check_source(Prompts("builtin:arth"))
    assert "known: builtin:arith" in why and "Did you mean 'builtin:arith'?" in why
    assert check_source(Demonstrations("builtin:arith")) is None


def test_lookups_import_no_torch():
    code = ("import sys; from rlflow import builtin; builtin.known_data(); builtin.model_dir('builtin:tiny-arith'); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_eval_rule_comes_from_the_pipeline():
    assert builtin.eval_rule(pipeline()) is signed_match  # the Score node's first rule
    assert builtin.eval_rule(pipeline(eval=Eval(rule=exact_match))) is exact_match  # Eval.rule first
    no_score = pipeline(nodes=[Loss("nll", model="actor")], data=Demonstrations("builtin:arith"))
    assert builtin.eval_rule(no_score) is exact_match  # the data provider's default


def test_eval_rule_round_trips_through_config():
    p = pipeline(eval=Eval(rule=exact_match))
    config = p.to_config()
    assert config["eval"]["rule"] == "rlflow.arith:exact_match"
    assert Eval.model_validate(config["eval"]).rule is exact_match


def test_init_is_the_same_whatever_the_thread_count(cache):
    before_threads, torch_rng, py_rng = torch.get_num_threads(), torch.get_rng_state(), random.getstate()
    torch.set_num_threads(2)
    try:
        path = builtin.ensure_builtin("builtin:tiny-arith-init")
        assert torch.get_num_threads() == 2  # restored after the one-thread build
    finally:
        torch.set_num_threads(before_threads)
    assert path.parent == cache / "models" and path.name.startswith("tiny-arith-init-v3-")
    assert sha256(path / "model.safetensors") == INIT_SHA256
    assert torch.equal(torch.get_rng_state(), torch_rng) and random.getstate() == py_rng  # caller's RNG untouched


DAMAGE = {"header": ("is truncated", lambda w: w.write_bytes(w.read_bytes()[:100])),
          "data": ("its header says", lambda w: w.write_bytes(w.read_bytes()[:-100])),
          "weights": ("no weights", lambda w: w.unlink()),
          "config": ("config.json is missing", lambda w: (w.parent / "config.json").write_text("{"))}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_cache_names_its_path_and_the_fix(cache, damage):
    path = builtin.ensure_builtin("tiny-arith-init")
    says, do = DAMAGE[damage]
    do(path / "model.safetensors")
    with pytest.raises(ModelLoadError) as e:
        resolve("builtin:tiny-arith-init")
    msg = str(e.value)
    assert f"the cached builtin:tiny-arith-init in {path} is damaged" in msg and says in msg
    assert f"rm -r '{path}'" in msg and "RLFLOW_CACHE" in msg


def test_a_trained_builtin_needs_the_train_callable(cache):
    with pytest.raises(RuntimeError, match="must pass train="):
        builtin.ensure_builtin("builtin:tiny-arith")
    assert not (cache / "models").exists() or not any((cache / "models").glob("tiny-arith-v3*"))


@pytest.fixture
def hub_env(monkeypatch):
    """A clean slate for the offline decision, restored after the test."""
    import huggingface_hub.constants

    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "RLFLOW_ONLINE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(models, "_OFFLINE", None)
    return monkeypatch


def test_hub_id_not_cached_fails_fast_when_the_hub_is_unreachable(hub_env, tmp_path):
    import huggingface_hub.constants

    hub_env.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: the probe fails at once
    hub_env.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    hub_env.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    t0 = time.perf_counter()
    with pytest.raises(ModelLoadError, match="'someorg/some-model' is not in the local Hugging Face cache"):
        resolve("someorg/some-model")
    assert time.perf_counter() - t0 < 20  # retries against the hub took about 50 s
    assert huggingface_hub.constants.HF_HUB_OFFLINE and models.hub_offline()


def test_rlflow_online_skips_the_probe(hub_env):
    hub_env.setenv("RLFLOW_ONLINE", "1")
    hub_env.setattr(models, "_reachable", lambda *a: pytest.fail("probed"))
    assert resolve("someorg/some-model") == "someorg/some-model"  # left to from_pretrained


@pytest.mark.slow
def test_tiny_arith_is_the_same_whatever_the_thread_count(cache):
    # builds builtin:tiny-arith from scratch (a 200-step SFT run in one thread, minutes)
    from rlflow.engine import train_pipeline

    torch.set_num_threads(2)
    try:
        path = builtin.ensure_builtin("builtin:tiny-arith", train=train_pipeline)
    finally:
        torch.set_num_threads(1)
    assert sha256(path / "model.safetensors") == TINY_ARITH_SHA256



def test_a_name_is_registered_once():
    from rlflow.provider import data_provider

    builtin.known_data()  # the shipped providers are in
    with pytest.raises(ValueError, match="builtin:arith' is registered twice"):
        data_provider("builtin:arith")(lambda kind, split: [])
