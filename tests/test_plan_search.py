"""medjax plan --search's candidates (no compile; the search itself compiles for TPU slices and is
tested in test_plan.py)."""

import pytest

from medjax.config import REPO_ROOT, load_config
from medjax.train.plan_search import Candidate, candidates, largest_fitting

CPT_7B = REPO_ROOT / "configs" / "quarkmed" / "cpt_qwen2.5-7b_v5e-64.yaml"


def test_candidates_split_heads_mlp_and_batch_evenly():
    found = candidates(load_config(CPT_7B), 64, 1)  # Qwen2.5-7B: 28 heads, 4 KV heads; 128 rows
    assert {(c.fsdp, c.tensor) for c in found} == {(64, 1), (32, 2), (16, 4)}
    assert {(c.remat, c.accum) for c in found} == {(r, a) for r in ("full", "save_attention") for a in (1, 2)}
    # Qwen2.5-0.5B has 2 KV heads: no tensor=4. 64 rows: two micro-batches need fsdp <= 32.
    small = load_config(CPT_7B, ["model.preset=qwen2.5-0.5b", "train.global_batch_size=64"])
    assert {(c.fsdp, c.tensor, c.accum) for c in candidates(small, 64, 1)} == {(64, 1, 1), (32, 2, 1), (32, 2, 2)}
    # across 2 slices the data axis doubles every micro-batch's shards
    assert {(c.fsdp, c.accum) for c in candidates(small, 64, 2)} == {(32, 1)}


def test_a_candidate_is_config_overrides():
    c = Candidate(fsdp=16, tensor=4, remat="save_attention", accum=2)
    cfg = load_config(CPT_7B, c.overrides(num_slices=2))
    assert (cfg.mesh.data, cfg.mesh.dcn_data, cfg.mesh.fsdp, cfg.mesh.tensor) == (-1, 2, 16, 4)
    assert (cfg.model.remat, cfg.train.grad_accum_steps) == ("save_attention", 2)


@pytest.mark.parametrize("start", [16, 64, 1024, 4096])
def test_largest_fitting_finds_the_largest_multiple_within_an_eighth_in_few_probes(start):
    """The arithmetic of `medjax plan --max-batch`, each probe a compile at real shape."""
    probes = []

    def fits(rows):
        probes.append(rows)
        return rows <= 300

    found = largest_fitting(fits, start, unit=8, limit=1 << 16)
    assert found % 8 == 0 and 300 - 300 // 8 <= found <= 300
    assert all(r % 8 == 0 for r in probes) and len(probes) == len(set(probes)) and len(probes) <= 10


def test_largest_fitting_stops_at_the_limit_and_reports_nothing_that_fits():
    assert largest_fitting(lambda rows: True, 16, unit=4, limit=64) == 64
    assert largest_fitting(lambda rows: False, 16, unit=4, limit=64) == 0
