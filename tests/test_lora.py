"""LoRA adapters: the adapted model starts as its base, only the adapters train (the base weights
come out bit-identical), runs resume exactly, and the exported PEFT adapter (and the merged export)
give transformers/peft the logits medjax computes."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import LORA, lora_sft_config, stage_config, straight_and_resumed, tiny_config
from flax import nnx, traverse_util

from medjax.config import ConfigError, OptimizerConfig, load_config
from medjax.convert import ConversionError
from medjax.convert.checkpoints import resolve_checkpoint
from medjax.convert.loading import checkpoint_reader
from medjax.models.config import LoraConfig, ModelConfig
from medjax.models.decoder import ModelDef
from medjax.models.layers import is_adapter
from medjax.train.loop import train
from medjax.train.optimizer import split_params, trained_patterns
from medjax.train.step import split_seed


def _flat(params):
    return traverse_util.flatten_dict(jax.device_get(params))


@pytest.mark.parametrize("scan_layers", [False, True])
def test_adapters_start_at_the_base_model(scan_layers):
    base_cfg = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_heads=4, scan_layers=scan_layers)
    lora_cfg = ModelConfig(**{**base_cfg.__dict__, "lora": LoraConfig(rank=4, alpha=8)})
    params = ModelDef(lora_cfg).init_params(jax.random.key(0))
    flat = _flat(params)
    adapters = {k: v for k, v in flat.items() if is_adapter(k)}
    assert len(adapters) == 2 * 7 * (1 if scan_layers else 2)  # A and B of 7 targets, per layer unless stacked
    assert all(not np.any(v) for k, v in adapters.items() if k[-1].endswith("_b"))  # B starts at zero
    assert all(np.any(v) for k, v in adapters.items() if k[-1].endswith("_a"))
    base = traverse_util.unflatten_dict({k: v for k, v in flat.items() if not is_adapter(k)})
    tokens = jnp.arange(24).reshape(2, 12) % 97
    np.testing.assert_array_equal(ModelDef(lora_cfg).bind(params)(tokens), ModelDef(base_cfg).bind(base)(tokens))
    # ... and a non-zero B changes the output by exactly scale * x A B on that projection
    bumped = {k: (v + 0.1 if k[-1] == "lora_q_b" else v) for k, v in flat.items()}
    out = ModelDef(lora_cfg).bind(traverse_util.unflatten_dict(bumped))(tokens)
    assert not np.allclose(out, ModelDef(base_cfg).bind(base)(tokens))


@pytest.mark.parametrize("scan_layers", [False, True])
def test_adapter_dropout_drops_the_adapters_input_alone_and_is_unbiased(scan_layers):
    """PEFT's lora_dropout: in a training forward (a dropout_rng) each adapter's input is dropped
    and rescaled, the base projection untouched; evaluation (no key) never drops."""
    from medjax.models.layers import AdapterDropout, Attention, lora_delta

    cfg = ModelConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_heads=4,
        scan_layers=scan_layers,
        lora=LoraConfig(rank=4, alpha=8, dropout=0.5),
    )
    model = ModelDef(cfg)
    params = model.init_params(jax.random.key(0))
    tokens = jnp.arange(24).reshape(2, 12) % 97
    key = jax.random.key(1)
    plain = model.bind(params)(tokens)
    np.testing.assert_array_equal(model.bind(params)(tokens, dropout_rng=key), plain)  # B = 0: nothing to drop
    bumped = traverse_util.unflatten_dict(
        {k: (v + 0.1 if str(k[-1]).endswith("_b") else v) for k, v in _flat(params).items()}
    )
    evaluated = model.bind(bumped)(tokens)
    trained = model.bind(bumped)(tokens, dropout_rng=key)
    assert not np.allclose(trained, evaluated) and not np.allclose(evaluated, plain)
    assert not np.allclose(trained, model.bind(bumped)(tokens, dropout_rng=jax.random.key(2)))
    # one adapter's delta: its mean over many masks is the undropped delta (inverted dropout)
    attn = Attention(cfg, rngs=nnx.Rngs(0))
    getattr(attn, "lora_q_b").set_value(jnp.full(attn.lora_q_b.shape, 0.1))
    x = jax.random.normal(jax.random.key(3), (1, 5, 32))
    want = lora_delta(attn, "q", x, 1, 2.0)
    draws = jax.vmap(lambda k: lora_delta(attn, "q", x, 1, 2.0, AdapterDropout(0.5, k)))(
        jax.random.split(jax.random.key(4), 4000)
    )
    np.testing.assert_allclose(draws.mean(0), want, atol=0.05 * float(jnp.abs(want).max()))
    assert float(draws.std(0).mean()) > 0.1 * float(jnp.abs(want).mean())  # the masks really vary


def test_only_the_adapters_train_by_default():
    lora = ModelConfig(lora=LoraConfig(rank=2))
    params = ModelDef(lora).abstract_params()
    trained, frozen = split_params(params, trained_patterns(OptimizerConfig(), lora))
    assert all(is_adapter(k) for k in traverse_util.flatten_dict(trained))
    assert not any(is_adapter(k) for k in traverse_util.flatten_dict(frozen))
    rm = ModelConfig(lora=LoraConfig(rank=2), score_labels=["a"])
    trained, _ = split_params(ModelDef(rm).abstract_params(), trained_patterns(OptimizerConfig(), rm))
    assert ("score",) in traverse_util.flatten_dict(trained)  # a reward model's fresh head trains too


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.lora.targets=[q, qkv]", r"unknown \['qkv'\]"),
        ("model.lora.rank=-1", "rank must be >= 0"),
        ("model.lora.dropout=1.0", r"must be in \[0, 1\)"),
        ("model.lora.ranks=4", "lora.ranks"),
    ],
)
def test_bad_lora_settings_are_named(override, message):
    with pytest.raises((ConfigError, ValueError), match=message):
        load_config(None, ["workdir=/tmp/unused", override]).model.validate()


def _whole_params(ref) -> dict:
    """Every tensor of the model, a trained-only checkpoint's frozen ones read from its base."""
    return checkpoint_reader(ref).read_all()


def _check_base_frozen_and_adapters_trained(cfg, result, loss_falls=True):
    losses = [result.losses[s] for s in sorted(result.losses)]
    assert not loss_falls or losses[-1] < losses[0], losses
    final = _flat(_whole_params(resolve_checkpoint(cfg.workdir)))
    start = _flat(ModelDef(cfg.model).init_params(split_seed(cfg.train.seed)[0]))
    assert final.keys() == start.keys()
    for key, value in final.items():
        if is_adapter(key) or key == ("score",):
            continue
        np.testing.assert_array_equal(value, start[key], err_msg="/".join(map(str, key)))
    assert any(np.any(v) for k, v in final.items() if str(k[-1]).endswith("_b") and is_adapter(k))


@pytest.mark.slow  # training runs
@pytest.mark.parametrize("stage", ["pretrain", "sft", "reward_model"])
def test_lora_trains_the_adapters_alone(world, tmp_path, stage):
    overrides = [*LORA, "train.max_steps=8", "train.checkpoint_every=8"]
    if stage == "pretrain":
        cfg = tiny_config(world, tmp_path / "run", *overrides)
    else:
        cfg = stage_config(world, tmp_path / "run", stage, *overrides)
    _check_base_frozen_and_adapters_trained(cfg, train(cfg))


@pytest.mark.slow  # training runs
def test_lora_rl_trains_the_adapters_alone(world, tmp_path):
    """RL's policy-gradient loss need not fall; the base stays put and the adapters move."""
    from test_rl import _rl_config, _task_file

    cfg = _rl_config(
        world,
        tmp_path / "run",
        _task_file(tmp_path),
        "model.lora.rank=4",
        "rl.kl_coef=0.05",
        "train.max_steps=4",
        "train.checkpoint_every=4",
    )
    _check_base_frozen_and_adapters_trained(cfg, train(cfg), loss_falls=False)
    # the KL reference is the base (the adapters disabled, no copy): nothing apart at the first step
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    kl = [r["kl"] for r in rows if "kl" in r]
    assert abs(kl[0]) < 1e-4 and kl[-1] > 1e-4, kl


@pytest.mark.slow  # training runs
def test_lora_resumes_exactly_with_scanned_layers(world, tmp_path):
    straight_and_resumed(lambda w: tiny_config(world, w, *LORA, "model.scan_layers=true"), tmp_path)


@pytest.mark.slow  # training runs
def test_plain_export_of_a_lora_run_says_what_to_do(world, tmp_path):
    from medjax.convert.hf_export import export_hf
    from medjax.convert.lora import export_adapter

    cfg = tiny_config(world, tmp_path / "run", *LORA, "train.max_steps=3")
    train(cfg)
    with pytest.raises(ConversionError, match="--adapter.*--merge"):
        export_hf(cfg.workdir, tmp_path / "hf")
    plain = tiny_config(world, tmp_path / "plain", "train.max_steps=3")
    train(plain)
    with pytest.raises(ConversionError, match="no LoRA adapters"):
        export_adapter(plain.workdir, tmp_path / "adapter")
    assert not (tmp_path / "hf").exists() and not (tmp_path / "adapter").exists()


@pytest.mark.slow  # transformers and peft load the exports
def test_peft_and_transformers_match_medjax(world, pretrained_run, tmp_path):
    pretrained = pretrained_run
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from medjax.convert.hf_export import export_hf
    from medjax.convert.lora import export_adapter

    cfg = lora_sft_config(world, pretrained, tmp_path / "run", "model.scan_layers=true")
    train(cfg)
    export_hf(pretrained, tmp_path / "base", dtype="float32")
    export_adapter(cfg.workdir, tmp_path / "adapter", base=str(tmp_path / "base"))
    export_hf(cfg.workdir, tmp_path / "merged", dtype="float32", merge=True)

    ref = resolve_checkpoint(cfg.workdir)
    tokens = np.random.default_rng(0).integers(0, ref.model.vocab_size, (2, 40))
    ours = np.asarray(ModelDef(ref.model).bind(_whole_params(ref))(jnp.asarray(tokens)))
    with torch.no_grad():
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
        adapted = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
        theirs = adapted(torch.tensor(tokens)).logits.numpy()
        merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
        merged_logits = merged(torch.tensor(tokens)).logits.numpy()
    start = resolve_checkpoint(pretrained)
    base_logits = np.asarray(ModelDef(start.model).bind(_whole_params(start))(jnp.asarray(tokens)))
    assert np.abs(ours - base_logits).max() > 1e-3  # the adapters changed the model
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
    np.testing.assert_allclose(merged_logits, ours, atol=1e-4, rtol=0)


@pytest.mark.slow  # transformers and peft
def test_a_peft_adapter_trained_elsewhere_continues_in_medjax(world, pretrained_run, tmp_path):
    """An adapter PEFT made (random, non-zero B) is where model.lora.adapter starts the adapters:
    medjax's logits then equal peft's, and a bad adapter is refused naming what differs."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from medjax.convert.hf_export import export_hf

    export_hf(pretrained_run, tmp_path / "base", dtype="float32")
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
    adapted = peft.get_peft_model(hf, lora)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    adapted.save_pretrained(tmp_path / "adapter")
    tokens = np.random.default_rng(0).integers(0, 512, (2, 24))
    with torch.no_grad():
        theirs = adapted.eval()(torch.tensor(tokens)).logits.numpy()

    def config(workdir, *extra):
        return lora_sft_config(
            world,
            pretrained_run,
            workdir,
            "model.lora.targets=[q, v, down]",
            f"model.lora.adapter={tmp_path / 'adapter'}",
            "model.scan_layers=true",
            *extra,
        )

    cfg = config(tmp_path / "run", "optimizer.learning_rate=0", "train.max_steps=1", "train.checkpoint_every=1")
    train(cfg)
    ref = resolve_checkpoint(cfg.workdir)
    ours = np.asarray(ModelDef(ref.model).bind(_whole_params(ref))(jnp.asarray(tokens)))
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    with pytest.raises(ConversionError, match="r is 4, the run's model.lora needs 8"):
        train(config(tmp_path / "bad", "model.lora.rank=8"))


@pytest.mark.slow  # training runs
def test_a_lora_run_over_init_from_checkpoints_its_adapters_alone(world, pretrained_run, tmp_path):
    """The frozen base is read again from init_from, never written: a checkpoint holds the adapters
    (and their optimizer state) alone, names the step it started from, resumes exactly, and every
    reader sees the whole model (the base bit for bit as init_from holds it)."""
    import shutil

    from medjax.convert.checkpoints import ParamReader, load_params

    shutil.copytree(pretrained_run, tmp_path / "base")  # moved away below

    straight_and_resumed(lambda w: lora_sft_config(world, tmp_path / "base", w), tmp_path)
    start = resolve_checkpoint(tmp_path / "base")
    ref = resolve_checkpoint(tmp_path / "split")
    assert ref.base == str(start.params_dir.parent)
    with pytest.raises(ConversionError, match="holds only the trained params"):
        load_params(ref)  # the stored tensors alone are not the model
    stored = ParamReader(ref).paths()  # what the checkpoint itself holds
    assert stored and all(is_adapter(p) for p in stored), stored
    assert len(checkpoint_reader(ref).paths()) == len(_flat(ModelDef(ref.model).abstract_params()))
    whole, base = _flat(_whole_params(ref)), _flat(_whole_params(start))
    for key, value in whole.items():
        if is_adapter(key):
            continue
        np.testing.assert_array_equal(value, base[key], err_msg="/".join(map(str, key)))
    assert any(np.any(v) for k, v in whole.items() if is_adapter(k) and str(k[-1]).endswith("_b"))
    # the base moved away: the run's checkpoint cannot be read, and says where it looked
    start.params_dir.parent.rename(start.params_dir.parent.with_name("moved"))
    with pytest.raises(ConversionError, match="holds only the trained params.*cannot be opened"):
        _whole_params(resolve_checkpoint(tmp_path / "split"))


@pytest.mark.slow  # training runs
def test_a_run_with_adapter_dropout_resumes_exactly_and_evaluates_undropped(world, pretrained_run, tmp_path):
    def config(workdir, *extra):
        return lora_sft_config(world, pretrained_run, workdir, "train.eval_at_start=true", "train.eval_every=6", *extra)

    dropped, _ = straight_and_resumed(lambda w: config(w, "model.lora.dropout=0.1"), tmp_path)
    plain = train(config(tmp_path / "plain"))
    assert dropped.eval_losses[0] == pytest.approx(plain.eval_losses[0], rel=1e-6)  # evaluation never drops
    assert dropped.losses[1] == pytest.approx(plain.losses[1], rel=1e-6)  # B starts at zero: nothing to drop yet
    assert abs(dropped.losses[6] - plain.losses[6]) > 1e-4  # ... but B's gradients saw dropped inputs
