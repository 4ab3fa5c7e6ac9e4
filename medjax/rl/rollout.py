"""Rollouts as the RL stage's data iterator: the one training loop asks for a batch, and this
samples G completions per prompt with the current policy, scores them, forms group advantages and
serves the rollout batch as minibatches for ``rl.epochs`` passes before sampling again.

Everything a resumed run needs is in ``get_state``: how many prompts were consumed (the prompt
order is a seeded Grain shuffle, so a count fixes the position), how many rollouts were sampled
(the sampling RNG folds that in), and the current rollout buffer with the position in it, so a run
stopped between two updates of one rollout continues on the same samples.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import random
import time
from typing import Callable

import grain
import jax
import jax.numpy as jnp
import numpy as np

from medjax.config import Config, ConfigError
from medjax.data.chat import ChatTemplate, stop_token_ids
from medjax.data.tokenizer import load_tokenizer, tokenizer_file
from medjax.models.decoder import ModelDef
from medjax.models.sampler import Sampler, SamplingConfig, host_arrays
from medjax.parallel.rules import MeshLayout
from medjax.rl.advantages import group_advantages, informative_groups, overlong_penalty
from medjax.rl.objective import ROW_KEYS, completion_window, token_logprobs
from medjax.rl.packing import pack_micro_batches, row_step
from medjax.rl.retrieval import load_retriever
from medjax.rl.rewards import RewardComposer, Sample
from medjax.tasks.prompts import PromptConfig, build_prompt, fit_passages
from medjax.tasks.readers import read_benchmark

log = logging.getLogger(__name__)


class PromptSet:
    """Exam items from the configured files, rendered once into prompt token ids; the order is a
    seeded Grain shuffle repeated forever, read by position.

    With rl.retriever, an item is also rendered with its retrieved passages (rl.passages_k, in the
    budget evaluation uses); a draw shows them with probability rl.retrieval_fraction, decided by
    its position. Entries ``i`` and ``i + len(items)`` are then one item bare and with passages:
    each is a prompt of its own to the rollout (its group, its mastery), as a policy that has
    mastered a question bare may still be misled by passages. A retrieved prompt too long for
    data.seq_len drops its last passages until it fits."""

    def __init__(self, cfg: Config, tokenizer, template: ChatTemplate):
        rl, data = cfg.rl, cfg.data
        items = [it for path in data.train_files for it in read_benchmark(path, skip_bad=data.skip_bad).items]
        retriever = load_retriever(rl.retriever, cfg) if rl.retrieval_fraction > 0 else None
        self.fraction = rl.retrieval_fraction if retriever is not None else 0.0
        self.seed = data.seed
        room = data.seq_len + 1 - rl.max_new_tokens

        def encode(text: str) -> list[int]:
            if rl.chat:
                text = template.render([{"role": "user", "content": text}], add_generation_prompt=True)
            return tokenizer.encode(text, add_special_tokens=False).ids

        self.items, self.texts, bare, grounded = [], [], [], []
        too_long = shortened = 0
        for item in items:
            question = build_prompt(item, cfg=PromptConfig(generative=True))
            ids = encode(question)
            if len(ids) > room:
                too_long += 1
                continue
            if self.fraction > 0:
                passages = fit_passages(retriever.retrieve(item.question, rl.passages_k), PromptConfig.passage_budget)
                fitted, shown = ids, 0  # no passage fits: the draw is asked bare
                for n in range(len(passages), 0, -1):
                    candidate = encode(build_prompt(item, passages=passages[:n], cfg=PromptConfig(generative=True)))
                    if len(candidate) <= room:
                        fitted, shown = candidate, n
                        break
                shortened += shown < len(passages)
                grounded.append(fitted)
            self.items.append(item)
            self.texts.append(question)
            bare.append(ids)
        if too_long:
            log.warning(
                "%d prompts left out: prompt + rl.max_new_tokens exceeds data.seq_len=%d", too_long, data.seq_len
            )
        if shortened:
            log.warning(
                "%d retrieved prompts shown fewer than rl.passages_k=%d passages to fit data.seq_len=%d",
                shortened,
                rl.passages_k,
                data.seq_len,
            )
        if not self.items:
            raise ConfigError(
                f"no usable RL prompts in {data.train_files} (data.seq_len={data.seq_len}, "
                f"rl.max_new_tokens={rl.max_new_tokens})"
            )
        self.left_out = too_long
        order = grain.MapDataset.range(len(self.items))
        if data.shuffle:
            order = order.shuffle(seed=data.seed)
        self.order = order.repeat(None)
        # The prompts a draw can be: bare, with passages, or (0 < fraction < 1) both.
        self.ids = (bare if self.fraction < 1 else []) + (grounded if self.fraction > 0 else [])
        if 0 < self.fraction < 1:
            self.items, self.texts = self.items * 2, self.texts * 2

    def retrieved(self, position: int) -> bool:
        """Whether the draw at ``position`` shows passages: a function of the seed and position."""
        if self.fraction in (0.0, 1.0):
            return self.fraction == 1.0
        return random.Random(f"{self.seed}:retrieval:{position}").random() < self.fraction

    def take(self, start: int, n: int) -> list[int]:
        """The prompt entries drawn at positions start .. start + n - 1."""
        both = 0 < self.fraction < 1
        half = len(self.ids) // 2
        return [int(self.order[p]) + (half if both and self.retrieved(p) else 0) for p in range(start, start + n)]

    def with_passages(self, entry: int) -> bool:
        return self.fraction == 1.0 or (0 < self.fraction < 1 and entry >= len(self.ids) // 2)


def check_rl_config(cfg: Config) -> None:
    """Settings that would train on nothing, or on noise, are errors naming the key."""
    rl = cfg.rl
    rules = [
        (rl.group_size >= 2, "rl.group_size must be at least 2 (advantages compare samples within a group)"),
        (rl.prompts_per_rollout >= 1, "rl.prompts_per_rollout must be at least 1"),
        (rl.epochs >= 1, "rl.epochs must be at least 1"),
        (rl.max_new_tokens >= 1, "rl.max_new_tokens must be at least 1"),
        (rl.clip_low >= 0 and rl.clip_high >= 0, "rl.clip_low and rl.clip_high must be non-negative"),
        (rl.kl_coef >= 0, "rl.kl_coef must be non-negative"),
        (0 <= rl.retrieval_fraction <= 1, "rl.retrieval_fraction must be in [0, 1]"),
        (rl.temperature > 0, "rl.temperature must be positive (RL samples; greedy rollouts give no signal)"),
        (rl.sequences_per_row >= 1, "rl.sequences_per_row must be at least 1"),
        (
            rl.sequences_per_row * rl.max_new_tokens <= cfg.data.seq_len,
            f"rl.sequences_per_row x rl.max_new_tokens = {rl.sequences_per_row * rl.max_new_tokens} passes "
            f"data.seq_len={cfg.data.seq_len}: each packed sequence's logits window is rl.max_new_tokens wide",
        ),
        (
            rl.overlong != "penalty" or 0 < rl.overlong_buffer <= rl.max_new_tokens,
            "rl.overlong_buffer must be in 1..rl.max_new_tokens",
        ),
    ]
    for ok, message in rules:
        if not ok:
            raise ConfigError(message)
    if rl.drop_mastered:
        labels = RewardComposer(rl.rewards).labels
        if rl.mastered_reward not in labels:
            raise ConfigError(
                f"rl.mastered_reward {rl.mastered_reward!r} is not one of the configured rewards "
                f"{labels} (rl.drop_mastered needs it)"
            )
    if cfg.data.eval_files:
        log.warning("stage rl ignores data.eval_files: evaluate the policy with `medjax eval --mode generate`")


class RolloutIterator:
    def __init__(
        self,
        cfg: Config,
        model: ModelDef,
        current_params: Callable[[], dict],
        reference_params: Callable[[], dict] | None,
        global_batch: int,
        batch_sharding=None,
    ):
        self.cfg, self.rl = cfg, cfg.rl
        check_rl_config(cfg)
        self.current_params, self.reference_params = current_params, reference_params
        rollout_size = self.rl.prompts_per_rollout * self.rl.group_size
        if rollout_size % global_batch:
            raise ConfigError(
                f"rl.prompts_per_rollout x rl.group_size = {rollout_size} is not a multiple of "
                f"train.global_batch_size = {global_batch}"
            )
        self.batch = global_batch
        # Every process samples the same rollout (the sampler's rows are split over all devices and
        # gathered back), keeps the same prompt pool and statistics, and hands the loop its block of
        # each micro-batch: the job trains on what one process would.
        self.accum = cfg.train.grad_accum_steps
        # Packed rows split as the unpacked ones would, over the batch's devices and the processes.
        self.micro = global_batch // self.accum
        shards = 1 if batch_sharding is None else self.micro // batch_sharding.shard_shape((self.micro, 1))[0]
        self.row_multiple = row_step(self.micro, math.lcm(shards, jax.process_count()))
        self.batch_sharding = batch_sharding  # rollout rows over (data, fsdp), as training splits batches
        tok_dir = tokenizer_file(cfg.data.tokenizer).parent
        self.tokenizer = load_tokenizer(tok_dir)
        self.prompts = PromptSet(cfg, self.tokenizer, ChatTemplate(tok_dir))
        self.sampling = SamplingConfig(
            max_new_tokens=self.rl.max_new_tokens,
            temperature=self.rl.temperature,
            top_p=self.rl.top_p,
            top_k=self.rl.top_k,
            stop_token_ids=stop_token_ids(self.tokenizer, cfg.model, tok_dir),
        )
        layout = None if batch_sharding is None else MeshLayout(batch_sharding.mesh)
        self.sampler = Sampler(model, layout=layout)
        self.rewards = RewardComposer(self.rl.rewards)
        self._ref_logprobs = jax.jit(self._window_logprobs(model, self.rl.max_new_tokens))
        self.prompts_used = 0  # positions read from the repeated, shuffled prompt order
        self.mastered: set[int] = set()  # prompts out of the pool (rl.drop_mastered)
        self.rollouts = 0
        self.buffer: dict[str, np.ndarray] | None = None
        self.schedule: list[np.ndarray] = []
        self.position = 0
        self._metrics: dict[str, float] = {}
        self._rollout_time = 0.0
        self._update_rows = self._update_tokens = self._update_steps = 0  # since the last pop_metrics
        self._last_pop = time.perf_counter()

    @staticmethod
    def _window_logprobs(model: ModelDef, width: int):
        """The reference's log p(target) at each row's completion window, put back at their
        positions of the [rows, seq] arrays (zero elsewhere)."""

        def logprobs(params, rows):
            window, _ = completion_window(rows["segment_ids"], width)
            lp = token_logprobs(model.bind(params), rows, entropy=False, window=window)[0]
            return jnp.zeros(rows["targets"].shape, lp.dtype).at[jnp.arange(lp.shape[0])[:, None], window].set(lp)

        return logprobs

    # -- iteration -------------------------------------------------------------------------------

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.buffer is None or self.position >= len(self.schedule):
            self._rollout()
        micro_batches = self.schedule[self.position].reshape(self.accum, -1)
        self.position += 1
        p = jax.process_index()
        if self.rl.sequences_per_row == 1:
            rows = {k: v[micro_batches] for k, v in self.buffer.items()}
        else:
            rows = pack_micro_batches(
                self.buffer, micro_batches, self.rl.sequences_per_row, self.row_multiple, most=self.micro
            )
        self._update_rows += rows["tokens"].shape[0] * rows["tokens"].shape[1]
        self._update_tokens += int((rows["segment_ids"] > 0).sum())
        self._update_steps += 1
        block = rows["tokens"].shape[1] // jax.process_count()  # this process's rows of each micro-batch
        return {k: v[:, p * block : (p + 1) * block].reshape(-1, v.shape[-1]) for k, v in rows.items()}

    def pop_metrics(self) -> dict[str, float]:
        """The latest rollout's metrics plus the time split since the last call."""
        now = time.perf_counter()
        out = dict(self._metrics)
        wall = now - self._last_pop
        out["rollout_time_s"] = self._rollout_time
        out["update_time_s"] = max(wall - self._rollout_time, 0.0)
        if self._update_steps:  # what the updates computed: rows a step, and the share holding tokens
            out["update_rows"] = self._update_rows / self._update_steps
            out["update_fill"] = self._update_tokens / (self._update_rows * self.cfg.data.seq_len)
        self._rollout_time, self._last_pop = 0.0, now
        self._update_rows = self._update_tokens = self._update_steps = 0
        return out

    # -- one rollout batch -----------------------------------------------------------------------

    def _sample_groups(self, attempt: int):
        rl = self.rl
        idx = self._next_prompts(rl.prompts_per_rollout)
        prompt_ids = [self.prompts.ids[i] for i in idx for _ in range(rl.group_size)]
        rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(self.cfg.train.seed), self.rollouts), attempt)
        params = self.current_params()
        t0 = time.perf_counter()
        gen = self.sampler.generate(params, prompt_ids, self.sampling, rng, batch_sharding=self.batch_sharding)
        gen_time = time.perf_counter() - t0
        stops = set(self.sampling.stop_token_ids)
        samples = []
        for row, i in enumerate(np.repeat(idx, rl.group_size)):
            n = int(gen.lengths[row])
            ids = gen.tokens[row, :n].tolist()
            truncated = n == rl.max_new_tokens and (not ids or ids[-1] not in stops)
            samples.append(
                Sample(
                    prompt=self.prompts.texts[i],
                    item=self.prompts.items[i],
                    num_tokens=n,
                    truncated=truncated,
                    completion_ids=tuple(ids),
                    completion=self.tokenizer.decode(ids, skip_special_tokens=True),
                )
            )
        total, parts = self.rewards(samples)
        if rl.overlong == "penalty":
            parts["overlong"] = overlong_penalty(
                gen.lengths, rl.max_new_tokens, rl.overlong_buffer, rl.overlong_penalty
            )
            total = total + parts["overlong"]
        shape = (rl.prompts_per_rollout, rl.group_size)
        return dict(
            prompt_ids=prompt_ids,
            prompt_index=idx,
            gen=gen,
            samples=samples,
            rewards=total.reshape(shape),
            parts={k: v.reshape(shape) for k, v in parts.items()},
            gen_time=gen_time,
        )

    def _next_prompts(self, n: int) -> list[int]:
        """The next ``n`` prompts of the shuffled order that are still in the pool. A mastered prompt
        appears at most once per pass, so skipping it here removes it from every later pass."""
        if len(self.mastered) >= len(self.prompts.items):
            raise StopIteration  # every prompt mastered: the loop ends the run ("data exhausted")
        idx = []
        while len(idx) < n:
            i = self.prompts.take(self.prompts_used, 1)[0]
            self.prompts_used += 1
            if i not in self.mastered:
                idx.append(i)
        return idx

    def _drop_mastered(self, sampled) -> int:
        """Adds every prompt whose whole group earned 1.0 on rl.mastered_reward to ``mastered``;
        returns how many left the pool."""
        before = len(self.mastered)
        for batch in sampled:
            values = batch["parts"][self.rl.mastered_reward]
            for g, prompt in enumerate(batch["prompt_index"]):
                if np.all(values[g] >= 1.0):
                    self.mastered.add(int(prompt))
        return len(self.mastered) - before

    def _rollout(self) -> None:
        rl = self.rl
        # The loop dispatches updates asynchronously: wait for the last one here, so its time is
        # counted as update time, not rollout time.
        jax.block_until_ready(self.current_params())
        t0 = time.perf_counter()
        kept, spare, sampled = [], [], []
        attempts = 0
        while len(kept) < rl.prompts_per_rollout and attempts <= (rl.max_refills if rl.dynamic_sampling else 0):
            batch = self._sample_groups(attempts)
            sampled.append(batch)
            useful = (
                informative_groups(batch["rewards"]) if rl.dynamic_sampling else np.ones(len(batch["rewards"]), bool)
            )
            for g in range(rl.prompts_per_rollout):
                (kept if useful[g] else spare).append((batch, g))
            attempts += 1
        topped_up = max(0, rl.prompts_per_rollout - len(kept))
        groups = (kept + spare[:topped_up])[: rl.prompts_per_rollout]  # all-equal groups add zero advantage
        self.buffer = self._rows(groups)
        order_rng = np.random.default_rng([self.cfg.train.seed, self.rollouts])
        size = rl.prompts_per_rollout * rl.group_size
        self.schedule = [
            perm[i : i + self.batch]
            for _ in range(rl.epochs)
            for perm in [order_rng.permutation(size)]
            for i in range(0, size, self.batch)
        ]
        self.position = 0
        self.rollouts += 1
        self._metrics = self._rollout_metrics(sampled, attempts, len(kept), topped_up)
        if rl.drop_mastered:
            self._metrics["prompts_dropped"] = float(self._drop_mastered(sampled))
            self._metrics["prompt_pool_size"] = float(len(self.prompts.items) - len(self.mastered))
        self._rollout_time += time.perf_counter() - t0

    def _rows(self, groups) -> dict[str, np.ndarray]:
        rl, seq = self.rl, self.cfg.data.seq_len
        n = len(groups) * rl.group_size
        rows = {
            k: np.zeros(
                (n, seq), np.float32 if k in ("loss_mask", "old_logprobs", "ref_logprobs", "advantages") else np.int32
            )
            for k in ROW_KEYS
        }
        r = 0
        for batch, g in groups:
            adv = group_advantages(batch["rewards"][g : g + 1], rl.advantage)[0]
            for j in range(rl.group_size):
                row = g * rl.group_size + j
                prompt = batch["prompt_ids"][row]
                n_gen = int(batch["gen"].lengths[row])
                full = np.asarray(list(prompt) + batch["gen"].tokens[row, :n_gen].tolist(), np.int32)
                length = len(full) - 1
                rows["tokens"][r, :length] = full[:-1]
                rows["targets"][r, :length] = full[1:]
                rows["positions"][r, :length] = np.arange(length)
                rows["segment_ids"][r, :length] = 1
                start = len(prompt) - 1  # the position whose target is the first completion token
                if not (rl.overlong == "filter" and batch["samples"][row].truncated):
                    rows["loss_mask"][r, start:length] = 1.0
                rows["old_logprobs"][r, start:length] = batch["gen"].logprobs[row, :n_gen]
                rows["advantages"][r, start:length] = adv[j]
                r += 1
        if rl.kl_coef > 0 and self.reference_params is not None:
            ref = self._ref_logprobs(
                self.reference_params(), {k: rows[k] for k in ("tokens", "targets", "positions", "segment_ids")}
            )
            rows["ref_logprobs"] = host_arrays(ref).astype(np.float32) * rows["loss_mask"]
        else:
            rows["ref_logprobs"] = rows["old_logprobs"].copy()  # unused (kl_coef 0) but finite
        return rows

    def _rollout_metrics(self, sampled, attempts, kept, topped_up) -> dict[str, float]:
        rewards = np.concatenate([b["rewards"].ravel() for b in sampled])
        lengths = np.concatenate([b["gen"].lengths for b in sampled])
        total_groups = sum(len(b["rewards"]) for b in sampled)
        out = {
            "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std()),
            "response_length_mean": float(lengths.mean()),
            "truncated_frac": float(np.mean([s.truncated for b in sampled for s in b["samples"]])),
            "groups_dropped_frac": float(1 - kept / total_groups) if self.rl.dynamic_sampling else 0.0,
            "groups_topped_up": float(topped_up),
            "rollout_attempts": float(attempts),
            "rollout_tokens_per_sec": float(lengths.sum() / max(sum(b["gen_time"] for b in sampled), 1e-9)),
        }
        for name in sampled[0]["parts"]:
            values = np.concatenate([b["parts"][name].ravel() for b in sampled])
            out[f"reward_{name}_mean"] = float(values.mean())
            out[f"reward_{name}_std"] = float(values.std())
        if "exam" in sampled[0]["parts"]:
            out["accuracy"] = float(np.mean(np.concatenate([b["parts"]["exam"].ravel() for b in sampled]) == 1.0))
        if self.prompts.fraction > 0:  # the two kinds of prompt apart: does the policy use its passages?
            shown = np.concatenate([[self.prompts.with_passages(int(i)) for i in b["prompt_index"]] for b in sampled])
            out["retrieved_frac"] = float(shown.mean())
            if "exam" in sampled[0]["parts"]:
                right = np.concatenate([b["parts"]["exam"] for b in sampled]) == 1.0  # [groups, group_size]
                for tag, rows in (("retrieved", shown), ("bare", ~shown)):
                    if rows.any():
                        out[f"accuracy_{tag}"] = float(right[rows].mean())
        return out

    # -- checkpointing (grain's handler stores these bytes beside the train state) ---------------

    def get_state(self) -> bytes:
        buffer = None
        if self.buffer is not None:
            blob = io.BytesIO()
            np.savez(blob, **self.buffer, **{f"schedule_{i}": s for i, s in enumerate(self.schedule)})
            buffer = base64.b64encode(blob.getvalue()).decode()
        return json.dumps(
            {
                "prompts_used": self.prompts_used,
                "rollouts": self.rollouts,
                "position": self.position,
                "schedule_len": len(self.schedule),
                "buffer": buffer,
                "mastered": sorted(self.mastered),
            }
        ).encode()

    def start_prefetch(self) -> None:  # grain's restore calls this; rollouts are made on demand
        pass

    def restore_from(self, data_dir) -> None:
        """Every process holds the same state, so any process's file restores it, whatever the
        process count that wrote it."""
        from medjax.data.streams import saved_state_files

        self.set_state(saved_state_files(data_dir)[0].read_bytes())

    def set_state(self, state: bytes) -> None:
        s = json.loads(state)
        self.prompts_used, self.rollouts, self.position = s["prompts_used"], s["rollouts"], s["position"]
        self.mastered = set(s.get("mastered", ()))
        self.buffer, self.schedule = None, []
        if s["buffer"] is not None:
            arrays = np.load(io.BytesIO(base64.b64decode(s["buffer"])))
            self.buffer = {k: arrays[k] for k in ROW_KEYS}
            self.schedule = [arrays[f"schedule_{i}"] for i in range(s["schedule_len"])]
