"""DPO: the data split into prompt and completions as TRL splits it, the loss and its gradients equal
to TRL's DPOTrainer on the same model, reference and pairs, and the stage training in the one loop
(LoRA with the adapters disabled as its reference, or a frozen copy), resuming exactly."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import straight_and_resumed, tiny_config
from flax import traverse_util

from medjax.config import ConfigError
from medjax.convert.checkpoints import resolve_checkpoint
from medjax.convert.loading import checkpoint_reader
from medjax.data.dpo import DpoConverter
from medjax.models.decoder import ModelDef
from medjax.models.layers import is_adapter
from medjax.train.loop import train
from medjax.train.objectives import DpoObjective
from medjax.train.step import split_seed


def dpo_config(world, workdir, *overrides):
    return tiny_config(
        world,
        workdir,
        "stage=dpo",
        f"data.train_files=[{world.files['preferences']}]",
        f"data.eval_files=[{world.files['preferences_eval']}]",
        "data.seq_len=256",
        "optimizer.weight_decay=0",
        "dpo.beta=0.5",
        *overrides,
    )


def _pairs(world, n):
    lines = open(world.files["preferences"]).read().splitlines()[:n]
    return [json.loads(line) for line in lines]


def test_completion_starts_where_prompt_and_reply_part(world):
    converter = DpoConverter(world.tokenizer, seq_len=512, overlong="truncate", skip_bad=False)
    record = _pairs(world, 1)[0]
    prompt, chosen, rejected = converter.split(record, "pairs.jsonl:1")
    assert np.array_equal(chosen[: len(prompt)], prompt) and np.array_equal(rejected[: len(prompt)], prompt)
    tokenizer, template = converter.tokenizer()
    reply = tokenizer.decode(chosen[len(prompt) :].tolist(), skip_special_tokens=False)
    assert reply.startswith(record["chosen"]) and "<|im_end|>" in reply  # the reply and its end of turn
    example, _ = converter.build(record, "pairs.jsonl:1")
    for side, ids in ((1, chosen), (2, rejected)):
        rows = example["side"] == side
        assert example["loss_mask"][rows].sum() == len(ids) - len(prompt)  # every completion token scored
        np.testing.assert_array_equal(example["targets"][rows], ids[1:])


def test_bad_pairs_and_settings_are_named(world, tmp_path):
    converter = DpoConverter(world.tokenizer, seq_len=128, overlong="truncate", skip_bad=False)
    with pytest.raises(Exception, match=r"pairs.jsonl:7: missing key 'rejected'"):
        converter.build({"prompt": "q", "chosen": "a"}, "pairs.jsonl:7")
    with pytest.raises(ConfigError, match="dpo.loss_type"):
        train(dpo_config(world, tmp_path / "a", "dpo.loss_type=hinge"))
    with pytest.raises(ConfigError, match="dpo.label_smoothing"):
        train(dpo_config(world, tmp_path / "b", "dpo.label_smoothing=0.5"))


def _flat(params):
    return traverse_util.flatten_dict(jax.device_get(params))


@pytest.mark.slow  # training runs
def test_lora_dpo_prefers_the_chosen_and_keeps_the_base(world, tmp_path):
    """Reference = the adapters disabled: no second copy. Over a few steps the policy's reward
    accuracy and margin rise from the reference's (0.5 and 0), and the base weights stay bit for bit."""
    cfg = dpo_config(
        world,
        tmp_path / "run",
        "model.lora.rank=8",
        "optimizer.learning_rate=0.01",
        "optimizer.warmup_steps=0",
        "train.max_steps=12",
        "train.checkpoint_every=12",
    )
    result = train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward_margin" in r and "loss" in r]
    # policy == reference at step 1 (up to float32 rounding of two programs' fusions)
    assert steps[0]["reward_margin"] == pytest.approx(0.0, abs=1e-4)
    assert steps[0]["loss"] == pytest.approx(np.log(2), abs=1e-4)
    assert np.mean([r["reward_accuracy"] for r in steps[-3:]]) > 0.8, [r["reward_accuracy"] for r in steps]
    assert steps[-1]["reward_margin"] > 0.1 and result.losses[12] < np.log(2)
    for key in ("reward_chosen", "reward_rejected", "logp_chosen", "logp_rejected"):
        assert key in steps[-1]
    final, start = (
        _flat(checkpoint_reader(resolve_checkpoint(cfg.workdir)).read_all()),
        _flat(ModelDef(cfg.model).init_params(split_seed(cfg.train.seed)[0])),
    )
    for key, value in final.items():
        if not is_adapter(key):
            np.testing.assert_array_equal(value, start[key], err_msg="/".join(map(str, key)))


@pytest.mark.slow  # training runs
def test_full_weight_dpo_resumes_exactly(world, pretrained_run, tmp_path):
    """Without adapters the reference is a frozen copy of init_from's weights, read again on resume."""
    straight_and_resumed(
        lambda w: dpo_config(world, w, f"init_from={pretrained_run}", "optimizer.learning_rate=0.001"), tmp_path
    )


@pytest.mark.slow  # transformers and TRL
@pytest.mark.parametrize("loss_type, label_smoothing", [("sigmoid", 0.0), ("ipo", 0.0), ("robust", 0.2)])
def test_loss_and_gradients_equal_trls(world, pretrained_run, tmp_path, loss_type, label_smoothing):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from medjax.convert.hf_export import export_hf
    from medjax.convert.loading import load_model
    from medjax.convert.weights import get_path, tensor_maps

    export_hf(pretrained_run, tmp_path / "ref", dtype="float32")
    torch.manual_seed(0)
    policy_hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ref", dtype=torch.float32)
    with torch.no_grad():  # a policy apart from its reference, so the log-ratios are not zero
        for p in policy_hf.parameters():
            p.add_(0.02 * torch.randn_like(p))
    policy_hf.save_pretrained(tmp_path / "policy")
    ref_hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ref", dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "ref")
    records = _pairs(world, 4)
    conversational = [
        {
            "prompt": [{"role": "user", "content": r["prompt"]}],
            "chosen": [{"role": "assistant", "content": r["chosen"]}],
            "rejected": [{"role": "assistant", "content": r["rejected"]}],
        }
        for r in records
    ]
    args = trl.DPOConfig(
        output_dir=str(tmp_path / "trl"),
        beta=0.5,
        loss_type=[loss_type],
        label_smoothing=label_smoothing,
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        bf16=False,
        dataset_num_proc=None,
    )
    trainer = trl.DPOTrainer(
        model=policy_hf,
        ref_model=ref_hf,
        args=args,
        train_dataset=datasets.Dataset.from_list(conversational),
        processing_class=tokenizer,
    )
    policy_hf.train()
    examples = [trainer.train_dataset[i] for i in range(4)]
    theirs = trainer.compute_loss(policy_hf, trainer.data_collator(examples))
    theirs.backward()
    their_grads = {name: p.grad.numpy() for name, p in policy_hf.named_parameters()}

    # the same pairs through medjax: the same tokens scored ...
    converter = DpoConverter(str(tmp_path / "ref"), seq_len=512, overlong="truncate", skip_bad=False)
    pairs = []
    for record, theirs_ids in zip(records, examples):
        prompt, chosen, rejected = converter.split(record, "pairs")
        assert prompt.tolist() == theirs_ids["prompt_ids"]
        assert chosen[len(prompt) :].tolist() == theirs_ids["chosen_ids"]
        assert rejected[len(prompt) :].tolist() == theirs_ids["rejected_ids"]
        pairs.append(converter.build(record, "pairs")[0])
    # ... one pair a row, padded
    width = max(len(p["tokens"]) for p in pairs)
    batch = {}
    for key in ("tokens", "targets", "loss_mask", "side"):
        batch[key] = np.stack([np.pad(p[key], (0, width - len(p[key]))) for p in pairs])
    batch["positions"] = np.stack([np.pad(p["local_positions"], (0, width - len(p["tokens"]))) for p in pairs])
    batch["pair_ids"] = (batch["side"] > 0).astype(np.int32)
    batch["segment_ids"] = batch["side"]
    model_cfg, policy, _ = load_model(tmp_path / "policy")
    _, reference, _ = load_model(tmp_path / "ref")
    model = ModelDef(model_cfg)
    objective = DpoObjective(0.5, loss_type, label_smoothing)

    def loss(params):
        total, count, _ = objective.loss(
            model.bind(params), jax.tree.map(jnp.asarray, batch), jax.random.key(0), reference=model.bind(reference)
        )
        return total / count

    ours, grads = jax.value_and_grad(loss)(policy)
    # float32 sums of ~100 token log-probs per side, in another order: agreement to ~1e-5
    assert float(ours) == pytest.approx(theirs.item(), rel=1e-4)
    for m in tensor_maps(model_cfg):
        want = their_grads[m.hf_name]
        got = m.to_hf(np.asarray(get_path(grads, m.path)))
        scale = np.abs(want).max()
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * scale + 1e-9, err_msg=m.hf_name)
