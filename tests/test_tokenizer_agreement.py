"""medjax's tokenizer (tokenizer.json via `tokenizers`) against transformers' AutoTokenizer for the
same directory: the reproduction of a Qwen2Tokenizer directory that splits digits differently,
its fix by adopting transformers' tokenizer.json, and the report when transformers is absent."""

import json
import os
import random
import shutil
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from medjax.data import DataError  # noqa: E402
from medjax.data.tokenizer import load_tokenizer, train_tokenizer  # noqa: E402
from medjax.data.tokenizer_agreement import (  # noqa: E402
    adopt_transformers_tokenizer,
    check_agreement,
    probe_strings,
    transformers_tokenizer_json,
)

AGE = "a 54-year-old man presents with"


def vignettes(n=600, seed=0):
    """Case-report text dense in numbers, so the BPE learns merges such as 'Ġ54' and '12'."""
    rng = random.Random(seed)
    symptoms = ["chest pain", "fever", "cough", "dyspnea", "headache", "abdominal pain"]
    out = []
    for _ in range(n):
        age = rng.randint(18, 90)
        out.append(
            f"A {age}-year-old {rng.choice(['man', 'woman', 'boy', 'girl'])} presents with {rng.choice(symptoms)} "
            f"for {rng.randint(2, 14)} days. Temperature {rng.randint(36, 40)}.{rng.randint(0, 9)} C, heart rate "
            f"{rng.randint(50, 140)}/min, blood pressure {rng.randint(90, 180)}/{rng.randint(50, 110)} mm Hg. "
            f"He was given {rng.choice(['0.5', '1', '2.5', '5', '10'])} mg/kg of drug {rng.randint(100, 99999)}. "
            f"The patient is a {age} year old with a history of {rng.choice(symptoms)}."
        )
    return out


@pytest.fixture(scope="module")
def native(world, tmp_path_factory):
    """A medjax-trained byte-level BPE (Qwen2's split rules, PreTrainedTokenizerFast)."""
    texts = [json.loads(line)["text"] for line in Path(world.files["pretrain"]).read_text().splitlines()]
    return train_tokenizer(texts + vignettes(), tmp_path_factory.mktemp("agreement") / "native", vocab_size=1024)


@pytest.fixture(scope="module")
def gpt2_split(world, native, tmp_path_factory):
    """The same texts and files, but the BPE trained with GPT-2's ByteLevel split and no
    normalizer (what medjax's train_tokenizer did before it took Qwen2's rules): it learns merges
    such as 'Ġ54' that Qwen2's one-digit split never produces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from medjax.data.tokenizer import SPECIAL_TOKENS

    texts = [json.loads(line)["text"] for line in Path(world.files["pretrain"]).read_text().splitlines()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.train_from_iterator(
        texts + vignettes(),
        trainer=trainers.BpeTrainer(
            vocab_size=1024,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    out = tmp_path_factory.mktemp("agreement") / "gpt2"
    shutil.copytree(native, out)
    (out / "tokenizer.json").write_text(tok.to_str())
    return out


def copy_with(src, dst, tokenizer_class=None, model_type=None):
    shutil.copytree(src, dst)
    if tokenizer_class is not None:
        cfg = json.loads((dst / "tokenizer_config.json").read_text())
        cfg["tokenizer_class"] = tokenizer_class
        (dst / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    if model_type is not None:
        (dst / "config.json").write_text(json.dumps({"model_type": model_type}))
    return dst


def hf_ids(directory, texts):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    return [list(tok.encode(t, add_special_tokens=False)) for t in texts]


def test_medjax_native_directory_agrees(native):
    pytest.importorskip("transformers")
    report = check_agreement(native)
    assert report.checked and report.agrees, report.details()
    assert report.differing_components == ()
    assert "identically" in report.message and str(native) in report.message
    assert AGE in report.probes and "1234567" in report.probes


def test_qwen2_tokenizer_class_splits_digits_differently(gpt2_split, tmp_path):
    pytest.importorskip("transformers")
    qwen = copy_with(gpt2_split, tmp_path / "qwen", tokenizer_class="Qwen2Tokenizer")
    report = check_agreement(qwen)
    assert report.checked and not report.agrees
    assert report.transformers_class == "Qwen2Tokenizer"
    assert AGE in report.differing_texts and "1234567" in report.differing_texts
    age = next(m for m in report.mismatches if m.text == AGE and not m.add_special_tokens)
    # medjax (GPT-2 regex) keeps " 54" whole; Qwen2's regex puts every digit on its own.
    assert "Ġ54" in age.medjax_tokens
    assert "Ġ54" not in age.transformers_tokens and "5" in age.transformers_tokens and "4" in age.transformers_tokens
    assert (len(age.medjax_ids), len(age.transformers_ids)) == (9, 11)
    assert f"'{AGE}' -> 9 vs 11 ids" in report.message
    assert "tokenizer mismatch in" in report.message and "transformers (Qwen2Tokenizer)" in report.message
    assert "pre_tokenizer" in report.differing_components
    assert str(list(age.transformers_ids)) in report.details()


def test_adopting_transformers_tokenizer_restores_agreement(gpt2_split, tmp_path):
    pytest.importorskip("transformers")
    qwen = copy_with(gpt2_split, tmp_path / "qwen", tokenizer_class="Qwen2Tokenizer")
    probes = list(check_agreement(qwen).probes)
    before = hf_ids(qwen, probes)
    adopt_transformers_tokenizer(qwen)
    report = check_agreement(qwen)
    assert report.agrees, report.details()
    assert report.differing_components == ()
    # adopting changes medjax, not transformers: both now give transformers' original ids
    assert hf_ids(qwen, probes) == before
    ours = load_tokenizer(qwen)
    assert [ours.encode(t, add_special_tokens=False).ids for t in probes] == before
    # and adopting again changes nothing
    assert json.loads(transformers_tokenizer_json(qwen)) == json.loads((qwen / "tokenizer.json").read_text())


def test_exports_agree_whatever_class_transformers_picks(native, gpt2_split, tmp_path):
    """A medjax export writes config.json (model_type qwen2, llama or qwen3) beside a
    PreTrainedTokenizerFast tokenizer_config; transformers 5 builds Qwen2Tokenizer for qwen2
    whatever tokenizer_class says. medjax's tokenizer agrees with every one of them; with GPT-2's
    split (medjax's tokenizer before the fix) the qwen2 export did not."""
    pytest.importorskip("transformers")
    for model_type in ("qwen2", "llama", "qwen3"):
        report = check_agreement(copy_with(native, tmp_path / model_type, model_type=model_type))
        assert report.agrees, report.details()
    old = check_agreement(copy_with(gpt2_split, tmp_path / "old", model_type="qwen2"))
    if old.transformers_class == "Qwen2Tokenizer":
        assert not old.agrees and AGE in old.differing_texts


def test_probes_cover_special_tokens_chat_template_and_extra(native):
    extra = "Troponin I 0.04 ng/mL at 06:00"
    probes = probe_strings(native, extra=[extra, ""])
    assert probes[-1] == extra and "" not in probes
    assert "<|im_start|>" in probes and "<|endoftext|>" in probes
    assert any(p.startswith("<|im_start|>system\n") and "54-year-old" in p for p in probes)  # chat template
    assert len(probes) == len(set(probes))


def test_extra_strings_are_checked(gpt2_split, tmp_path):
    pytest.importorskip("transformers")
    qwen = copy_with(gpt2_split, tmp_path / "qwen", tokenizer_class="Qwen2Tokenizer")
    report = check_agreement(qwen, extra=["dose 99999 units"])
    assert "dose 99999 units" in report.probes and "dose 99999 units" in report.differing_texts


def test_without_transformers_the_report_says_not_checked(native, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    report = check_agreement(native)
    assert not report.checked and not report.agrees
    assert report.message.startswith("tokenizer agreement with transformers not checked for")
    assert "not installed" in report.message
    with pytest.raises(DataError, match="transformers is not installed"):
        transformers_tokenizer_json(native)


def test_transformers_failing_to_load_is_not_checked(native, tmp_path):
    pytest.importorskip("transformers")
    broken = copy_with(native, tmp_path / "broken")
    (broken / "tokenizer_config.json").write_text("{ not json")
    report = check_agreement(broken)
    assert not report.checked and "transformers could not load it" in report.reason
    with pytest.raises(DataError, match="could not load"):
        transformers_tokenizer_json(broken)


@pytest.fixture
def qwen_hf_dir(gpt2_split, tmp_path):
    """A tiny Qwen2 model directory whose tokenizer.json has GPT-2's split (the reported case)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen2Config(
        vocab_size=1024,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    out = tmp_path / "hf"
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(out)
    for f in gpt2_split.iterdir():
        shutil.copy2(f, out / f.name)
    return out


def test_import_reports_the_mismatch_and_can_adopt_transformers_tokenizer(qwen_hf_dir, tmp_path, capsys):
    from medjax.cli import main

    assert main(["import", str(qwen_hf_dir), str(tmp_path / "as_file")]) == 0
    err = capsys.readouterr().err
    assert "warning: tokenizer mismatch in" in err and f"'{AGE}' -> 9 vs 11 ids" in err
    assert "--tokenizer transformers" in err
    assert main(["import", str(qwen_hf_dir), str(tmp_path / "adopted"), "--tokenizer", "transformers"]) == 0
    assert "mismatch" not in capsys.readouterr().err
    probes = list(check_agreement(qwen_hf_dir).probes)
    ours = load_tokenizer(tmp_path / "adopted" / "tokenizer")
    assert [ours.encode(t, add_special_tokens=False).ids for t in probes] == hf_ids(qwen_hf_dir, probes)
    kept = load_tokenizer(tmp_path / "as_file" / "tokenizer")
    assert kept.encode(AGE).ids != hf_ids(qwen_hf_dir, [AGE])[0]  # "file" kept tokenizer.json as it was


def test_a_weights_only_hf_dir_imports_with_a_note(qwen_hf_dir, tmp_path, capsys):
    """No tokenizer.json: the weights import (exit 0) and the note says how to get a tokenizer;
    the model dir holds no empty tokenizer folder that would read as one."""
    from medjax.cli import main

    weights = tmp_path / "weights_only"
    weights.mkdir()
    for f in qwen_hf_dir.iterdir():
        if f.name == "config.json" or f.suffix == ".safetensors":
            shutil.copy2(f, weights / f.name)
    assert main(["import", str(weights), str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert f"note: {weights} has no tokenizer.json" in err and "--tokenizer transformers" in err
    assert (tmp_path / "out" / "model.json").is_file() and not (tmp_path / "out" / "tokenizer").exists()


def test_generate_on_a_disagreeing_hf_dir_warns(qwen_hf_dir, capsys):
    from medjax.convert.loading import load_model

    load_model(qwen_hf_dir)
    assert "warning: tokenizer mismatch in" in capsys.readouterr().err


def test_an_agreeing_tokenizer_is_checked_once(native, gpt2_split, tmp_path, monkeypatch, capsys):
    """warn_if_disagreeing remembers a tokenizer that agreed (keyed by its files and the
    transformers version), so loading the same export again skips the check; a changed
    tokenizer.json is checked afresh, and a disagreeing one is never remembered."""
    pytest.importorskip("transformers")
    from medjax.data.tokenizer_agreement import warn_if_disagreeing

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    first = warn_if_disagreeing(native)
    assert first.agrees and "cached" not in first.reason
    again = warn_if_disagreeing(native)
    assert again.agrees and "cached" in again.reason
    changed = copy_with(native, tmp_path / "changed", tokenizer_class="Qwen2Tokenizer")
    assert warn_if_disagreeing(changed).agrees  # a changed file is another key: checked, and agrees
    shutil.copy2(gpt2_split / "tokenizer.json", changed / "tokenizer.json")
    for _ in range(2):  # a mismatch warns every time
        report = warn_if_disagreeing(changed)
        assert report.checked and not report.agrees and "cached" not in report.reason
        assert "warning: tokenizer mismatch in" in capsys.readouterr().err
    assert len(list((tmp_path / "cache" / "medjax" / "tokenizer-agreement").iterdir())) == 2
