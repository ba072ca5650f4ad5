"""The step loop: schedule -> one forward pass -> sample -> append, stop-check, detokenize, stream out."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import uuid
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass

import numpy as np
import torch

from lamina.config import EngineConfig, ModelConfig
from lamina.engine import sampler, speculative
from lamina.engine.errors import ParallelFailure, RequestError, check_context_length
from lamina.engine.grammar import GrammarCompiler, TokenMasks
from lamina.engine.kv_cache import BlockManager
from lamina.engine.metrics import EngineStats, StepStats
from lamina.engine.model_runner import ModelRunner
from lamina.engine.profiler import StepCosts, StepProfiler, StepShape
from lamina.engine.resolve import resolve
from lamina.engine.scheduler import ScheduledBatch, Scheduler
from lamina.engine.sequence import Sequence, SequenceStatus
from lamina.sampling_params import (CompletionOutput, RequestMetrics, RequestOutput, SamplingParams,
                                    TokenLogprob)
from lamina.tokenizer import IncrementalDetokenizer, Tokenizer

log = logging.getLogger("lamina.engine")

GENERATION_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[Sequence]
    metrics: RequestMetrics
    aborted: bool = False
    grammar: Future | None = None   # its CompiledGrammar, until its sequences have their states

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


def read_generation_config(model_dir: str) -> dict:
    path = os.path.join(model_dir, "generation_config.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


class LLMEngine:
    def __init__(self, config: EngineConfig):
        torch.manual_seed(config.seed)  # the noise of unseeded sampling
        if os.path.isdir(config.model):
            model_dir = config.model
        else:
            from lamina.registry import resolve_model
            model_dir = resolve_model(config.model)
        self.model_dir = model_dir
        self.model_config = ModelConfig.from_dir(model_dir)
        self.tokenizer = Tokenizer(model_dir)
        gen = read_generation_config(model_dir)
        self.generation_defaults = {k: gen[k] for k in GENERATION_DEFAULT_KEYS if gen.get(k) is not None}
        eos = gen.get("eos_token_id", [])
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.eos_token_ids = set(eos) | set(self.model_config.eos_token_id)
        if self.tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(self.tokenizer.eos_token_id)
        resolved = resolve(config, model_dir, self.model_config)
        # with tensor parallelism, the other ranks (lamina/distributed); this process is rank 0
        self.workers = None
        if resolved.tensor_parallel_size > 1:
            from lamina.distributed.workers import Workers
            self.workers = Workers(resolved)
            resolved = dataclasses.replace(resolved, device=self.workers.device)
        try:
            self.runner = ModelRunner(resolved, *((self.workers.context, self.workers.channel) if self.workers else ()))
        except BaseException:
            self.shutdown()
            raise
        capacity = self.runner.num_blocks * resolved.block_size
        if capacity < resolved.max_model_len:
            # as vLLM does: one full-length sequence must fit, so shrink the context to the cache
            log.warning("the KV cache holds %d tokens, less than the context of %d: serving a context of %d",
                        capacity, resolved.max_model_len, capacity)
            resolved = dataclasses.replace(resolved, max_model_len=capacity)
        self.config = dataclasses.replace(resolved, num_kv_blocks=self.runner.num_blocks)
        self.max_model_len = self.config.max_model_len
        self.block_manager = BlockManager(self.runner.num_blocks, self.config.block_size, self.config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, self.config.max_num_seqs, self.config.max_num_batched_tokens)
        self.drafter = None
        if self.config.speculative is not None and self.config.speculative.method == "draft_model":
            from lamina.engine.draft_model import DraftModel
            self.drafter = DraftModel(self.config.speculative, self.config, self.tokenizer.vocab(),
                                      self.runner, self.block_manager)
        self.requests: dict[str, Request] = {}
        width = self.model_config.vocab_size
        self.grammars = GrammarCompiler(self.tokenizer.to_json(), width, list(self.eos_token_ids))
        self.token_masks = TokenMasks(width)
        self._awaiting_grammar: list[Request] = []
        self._step_accepted = 0   # draft tokens this step kept (speculative decoding)
        self.stats = EngineStats(kv_blocks_total=self.runner.num_blocks, kv_blocks_free=self.runner.num_blocks,
                                 block_size=self.config.block_size)
        cfg = self.config
        costs = (StepCosts.of(self.runner.model, self.runner.kv_dtype)
                 if cfg.profile_steps or cfg.trace_dir else None)
        self.profiler = StepProfiler(enabled=cfg.profile_steps, trace_dir=cfg.trace_dir,
                                     torch_steps=cfg.profile_torch_steps, costs=costs)
        self._last_log = time.monotonic()
        self._pending_outputs: list[RequestOutput] = []
        log.info("model %s: %s", self.config.model, self.config.summary())
        log.info("KV cache: %d blocks of %d = %d tokens (%.2f GiB)", self.runner.num_blocks, self.config.block_size,
                 self.kv_capacity_tokens, self.runner.num_blocks * self.runner.bytes_per_block / 2**30)
        from lamina.env import one_line_summary
        log.info("%s", one_line_summary(device=self.config.device, attention_backend=self.config.backend.name,
                                        execution=self.runner.execution))

    def wait_until_compiled(self, timeout: float | None = None) -> bool:
        """Block until the background compile of the steps is done; True if compiled steps serve
        now, or the engine runs without them by choice."""
        compiled = self.runner.compiled
        ready = compiled is None or compiled.wait(timeout)
        return ready and (self.drafter is None or self.drafter.wait_until_compiled(timeout))

    @property
    def kv_capacity_tokens(self) -> int:
        return self.runner.num_blocks * self.config.block_size

    # -- requests ----------------------------------------------------------------------------------
    def encode_prompt(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            prompt = prompt["prompt"]
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        return None, list(prompt)

    def validate(self, prompt_token_ids: list[int], params: SamplingParams, prompt_param: str = "prompt") -> None:
        """Refuse at once what could never be served; nothing is left waiting forever. Errors name
        the prompt `prompt_param` (the server's "messages" for a chat)."""
        n = len(prompt_token_ids)
        if n == 0:
            raise RequestError(f"The {prompt_param} is empty.", param=prompt_param)
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_token_ids):
            raise RequestError(f"The {prompt_param}'s token ids must be in [0, {vocab}).", param=prompt_param)
        params.check_token_ids(vocab)
        check_context_length(self.max_model_len, n, params.max_tokens, prompt_param)

    def add_request(self, request_id: str | None, prompt, params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> str:
        request_id = request_id or uuid.uuid4().hex
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already in use", param="request_id")
        params = (params or SamplingParams()).with_defaults(self.generation_defaults)
        text, ids = self.encode_prompt(prompt)
        self.validate(ids, params)
        if params.max_tokens is None:
            params.max_tokens = self.max_model_len - len(ids)
        metrics = RequestMetrics(arrival_time=arrival_time or time.time())
        seqs = [Sequence(request_id, i, ids, params,
                         IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens), metrics)
                for i in range(params.n)]
        for s in seqs[1:]:
            s.wait_for = seqs[0]
        req = Request(request_id, text, ids, seqs, metrics)
        if params.structured_outputs is not None:
            # compiled off this thread; its sequences wait in the queue until it is ready
            req.grammar = self.grammars.compile(params.structured_outputs)
            for s in seqs:
                s.awaiting_grammar = req.grammar
            self._awaiting_grammar.append(req)
        self.requests[request_id] = req
        for s in seqs:
            self.scheduler.add(s)
        self.stats.prompt_tokens_total += len(ids)
        return request_id

    def abort(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        for seq in req.seqs:
            if not seq.is_finished:
                self.scheduler.remove(seq)
                self._finish(seq, "abort")
        req.aborted = True
        self._pending_outputs.append(self._make_output(req))

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or bool(self._pending_outputs)

    # -- the step ----------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        prof = self.profiler
        prof.start()
        if self._awaiting_grammar:
            self._start_grammars()
        if self.config.speculative is not None:
            self._propose()
        self._step_accepted = 0
        batch = self.scheduler.schedule()
        prof.mark("schedule")
        if prof.enabled:
            prof.describe(self._shape(batch))
        outputs, self._pending_outputs = self._pending_outputs, []
        if not batch.seqs and self._awaiting_grammar and not outputs:
            # nothing can run until a grammar is compiled: wait for one rather than spin
            wait([r.grammar for r in self._awaiting_grammar], timeout=0.01, return_when=FIRST_COMPLETED)
        if self.workers is not None:
            self.workers.check()
        if batch.seqs:
            try:
                self._run_batch(batch, outputs)
            except ParallelFailure:   # the ranks are out of step: no request can be run again
                raise
            except Exception:
                # One request's data (a sampling parameter, a token id) can break a whole step.
                # Nothing was committed, so the sequences are run again one at a time: only the
                # requests that still fail are failed, and everyone else goes on.
                log.exception("a step of %d sequences failed; running them one at a time", len(batch.seqs))
                self._run_one_by_one(batch, outputs)
        self._update_stats(batch)
        prof.stop(accepted_tokens=self._step_accepted)
        return outputs

    def _start_grammars(self) -> None:
        """Give each sequence whose grammar has compiled its own state, so it may be scheduled; a
        grammar that failed to compile fails its request with the compiler's reason."""
        still = []
        for req in self._awaiting_grammar:
            if req.request_id not in self.requests or req.finished:
                continue
            if not req.grammar.done():
                still.append(req)
                continue
            error = req.grammar.exception()
            for seq in req.seqs:
                seq.awaiting_grammar = None
                if error is None:
                    seq.grammar = req.grammar.result().new_state()
            if error is not None:
                log.info("request %s: %s", req.request_id, error)
                self._fail_request(req.request_id, self._pending_outputs, str(error))
        self._awaiting_grammar = still

    @staticmethod
    def _shape(batch: ScheduledBatch) -> StepShape:
        """What the step runs, for the profiler and the trace (before it changes any sequence)."""
        context = sampled = pairs = 0
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            before = seq.num_computed_tokens
            context += before + n
            sampled += (len(seq.draft) + 1) * (before + n == len(seq) + len(seq.draft))
            pairs += n * before + n * (n + 1) // 2      # each new token attends to the prefix and to itself
        decode = batch.num_decode + batch.num_draft
        return StepShape(prefill_tokens=batch.num_tokens - decode, decode_tokens=decode, num_seqs=len(batch.seqs),
                         sampled_rows=sampled, context_tokens=context, attended_pairs=pairs,
                         drafted_tokens=batch.num_draft)

    def close(self) -> None:
        """Finish what the engine writes on its way out (the step traces of --trace-dir), and stop
        the tensor-parallel workers."""
        self.shutdown()
        self.profiler.close()
        self.grammars.close()

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers, if any (idempotent); the engine cannot step after."""
        if self.workers is not None:
            self.workers.shutdown()

    def profile_report(self) -> str:
        """--profile-steps' report; on CPU beside this machine's peaks, measured now (a second or two)."""
        from lamina.engine.profiler import measure_peaks
        peaks = measure_peaks() if self.config.device.type == "cpu" and self.profiler.steps else None
        return self.profiler.report(peaks)

    def _run_batch(self, batch: ScheduledBatch, outputs: list[RequestOutput]) -> None:
        prof = self.profiler
        logits_rows, samplers = self._logits_plan(batch)
        inputs = self.runner.prepare(batch, logits_rows)
        prof.mark("prepare")
        logits = self.runner.forward(*inputs)
        if prof.enabled:  # GPU work is asynchronous: wait for it, or sampling gets the blame
            self.runner.synchronize()
        prof.mark("forward")
        self._process(batch, logits, logits_rows, samplers, outputs)

    def _run_one_by_one(self, batch: ScheduledBatch, outputs: list[RequestOutput]) -> None:
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            if seq.is_finished:  # a sibling already failed its request
                continue
            try:
                self._run_batch(ScheduledBatch([seq], [n]), outputs)
            except ParallelFailure:
                raise
            except Exception:
                log.exception("request %s failed in the engine", seq.request_id)
                self._fail_request(seq.request_id, outputs)

    def _fail_request(self, request_id: str, outputs: list[RequestOutput],
                      error: str = "the engine failed while serving this request; other requests are unaffected"
                      ) -> None:
        req = self.requests.get(request_id)
        if req is None:
            return
        for seq in req.seqs:
            if not seq.is_finished:
                self._finish(seq, "error")
        out = self._make_output(req)
        out.error = error
        outputs.append(out)

    @staticmethod
    def _prompt_rows(seq: Sequence, n: int) -> range:
        """Rows of seq's next n tokens whose logits give prompt logprobs not recorded yet: a
        recomputed sequence (after preemption) records none twice."""
        if seq.prompt_logprobs is None:
            return range(0)
        start = seq.num_computed_tokens
        first = max(start, len(seq.prompt_logprobs) - 1)   # entry i is token i's, from position i - 1
        end = min(start + n, seq.num_prompt_tokens - 1)
        return range(first - start, max(end, first) - start)

    def _logits_plan(self, batch: ScheduledBatch):
        """Which new tokens of each sequence need logits: the last one if it completes the known
        tokens (we then sample), plus the prompt tokens whose logprobs were asked for."""
        rows, samplers = [], []
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            done = seq.num_computed_tokens + n == len(seq) + len(seq.draft)
            r = list(self._prompt_rows(seq, n))
            if done:   # prompt rows end before the last prompt token, so n - 1 is never among them
                r.extend(range(n - 1 - len(seq.draft), n))   # a draft's k tokens, and the one before
            rows.append(np.asarray(r, dtype=np.int64))
            samplers.append(done)
        return rows, samplers

    def _process(self, batch, logits, logits_rows, samplers, outputs):
        """Prompt logprobs and sampling first, then the sequences' state: a step that fails before
        the commit changed nothing and can run again."""
        prof = self.profiler
        offset = 0
        records, sample_seqs, sample_rows, verify_seqs, verify_rows = [], [], [], [], []
        for seq, n, rows, samples in zip(batch.seqs, batch.num_new_tokens, logits_rows, samplers):
            prompt_rows = self._prompt_rows(seq, n)
            records.append(self._prompt_logprobs(seq, logits[offset:offset + len(prompt_rows)], prompt_rows)
                           if len(prompt_rows) else None)
            if samples and seq.draft:
                verify_seqs.append(seq)
                verify_rows.append(offset + len(rows) - 1 - len(seq.draft))
            elif samples and seq.params.max_tokens != 0:
                sample_seqs.append(seq)
                sample_rows.append(offset + len(rows) - 1)
            offset += len(rows)
        token_ids, logprobs = self._sample_rows(sample_seqs, sample_rows, logits) if sample_seqs else ([], [])
        kept = [self._verify(seq, first, logits) for seq, first in zip(verify_seqs, verify_rows)]
        prof.mark("sample")
        now = time.time()
        verified = {seq.seq_id: len(tokens) - 1 for seq, (tokens, _) in zip(verify_seqs, kept)}
        for seq, n, samples, recs in zip(batch.seqs, batch.num_new_tokens, samplers, records):
            if recs:
                seq.prompt_logprobs.extend(recs)
            if seq.seq_id in verified:   # the cache keeps the accepted drafts' K/V, not the rejected ones'
                self._commit_draft(seq, n, verified[seq.seq_id])
            else:
                seq.num_computed_tokens += n
            self.block_manager.register_full_blocks(seq)
            if samples and seq.params.max_tokens == 0:   # scoring only: the prompt's logprobs
                self._finish(seq, "length")
                outputs.append(self._make_output(self.requests[seq.request_id]))
        touched: dict[str, Request] = {}
        runs = [([t], [lp]) for t, lp in zip(token_ids, logprobs)] + kept
        for seq, (tokens, lps) in zip(sample_seqs + verify_seqs, runs):
            if seq.is_finished:  # its request failed on an earlier sample of this step
                continue
            try:
                for tok, lp in zip(tokens, lps):   # a stop ends the run: later tokens are dropped
                    self._append(seq, tok, lp, now)
                    if seq.is_finished:
                        break
            except Exception:  # committed state is kept; only this request ends
                log.exception("request %s failed in the engine", seq.request_id)
                touched.pop(seq.request_id, None)
                self._fail_request(seq.request_id, outputs)
                continue
            touched[seq.request_id] = self.requests[seq.request_id]
        for req in touched.values():
            outputs.append(self._make_output(req))
        prof.mark("detokenize")

    def _verify(self, seq: Sequence, first: int, logits) -> tuple[list[int], list]:
        """Check seq's draft against the logits of its k+1 rows from `first`: the tokens to keep
        (accepted drafts, then one of the model's own) and their logprob records. Each row is
        sampled as plain decoding would sample it there (penalties and min_tokens counting the
        drafts before it)."""
        draft, p = seq.draft, seq.params
        rows = logits[first:first + len(draft) + 1]
        outputs = seq.output_token_ids
        history = [outputs + draft[:i] for i in range(len(draft) + 1)]
        banned = [[] if len(h) >= p.min_tokens else self._banned(seq) for h in history]
        sb = sampler.SamplingBatch.build([p] * len(history), [seq.token_ids[:seq.num_prompt_tokens] if p.penalized
                                                               else []] * len(history),
                                         history if p.penalized else [[]] * len(history), banned,
                                         [None] * len(history))
        processed = sampler.processed_logits(rows, sb)
        probs = processed if p.greedy else sampler.probabilities(processed, sb)
        tokens = speculative.verify(probs.float().cpu(), p.greedy, draft, seq.generator)
        lps = (sampler.compute_logprobs(rows[:len(tokens)], tokens, [p.logprobs] * len(tokens))
               if p.logprobs is not None else [None] * len(tokens))
        return tokens, lps

    def _commit_draft(self, seq: Sequence, n: int, accepted: int) -> None:
        k = len(seq.draft)
        seq.num_computed_tokens += n - (k - accepted)
        self.block_manager.trim(seq)
        seq.draft = []
        seq.spec.drafted += k
        seq.spec.accepted += accepted
        seq.metrics.spec_drafted += k
        seq.metrics.spec_accepted += accepted
        self.stats.record_draft(k, accepted)
        self._step_accepted += accepted

    def _propose(self) -> None:
        """Drafts for this step's decoding sequences; none where a draft could overshoot max_tokens
        or the context, for constrained sequences, or where drafting has stopped paying off."""
        cfg = self.config.speculative
        seqs, ks = [], []
        for seq in self.scheduler.running:
            if seq.in_prefill or seq.grammar is not None or not seq.spec.worth_it:
                continue
            p = seq.params
            k = min(cfg.num_speculative_tokens, p.max_tokens - seq.num_output_tokens - 1,
                    self.max_model_len - len(seq) - 1)
            if k > 0:
                seqs.append(seq)
                ks.append(k)
        if self.drafter is not None:
            self.drafter.propose(seqs, ks)
            return
        for seq, k in zip(seqs, ks):
            seq.draft = speculative.propose_ngram(seq.token_ids, k, cfg.prompt_lookup_max, cfg.prompt_lookup_min)

    def _sample_rows(self, sample_seqs, sample_rows, logits):
        params = [s.params for s in sample_seqs]
        banned = [self._banned(s) for s in sample_seqs]
        # rows only grow, so as many rows as logits means all of them: no copy (at 100 sequences it
        # would be tens of MB of float32 per step)
        if len(sample_rows) < logits.shape[0]:
            logits = logits[np.asarray(sample_rows)]
        allowed = self.token_masks.allowed([s.grammar for s in sample_seqs], logits.device)
        if sampler.is_plain_greedy(params, banned):
            return sampler.argmax_rows(sampler.apply_allowed(logits, allowed)), [None] * len(params)
        return self._sample(sample_seqs, params, banned, logits, allowed)

    def _sample(self, sample_seqs, params, banned, logits, allowed):
        # token histories only feed the penalties: skip copying them on every step when none is set
        penalized = any(p.penalized for p in params)
        prompts = [s.token_ids[:s.num_prompt_tokens] if penalized else [] for s in sample_seqs]
        outputs_so_far = [s.output_token_ids if penalized else [] for s in sample_seqs]
        sb = sampler.SamplingBatch.build(params, prompts, outputs_so_far, banned, [s.generator for s in sample_seqs],
                                         allowed)
        return sampler.sample(logits, sb)

    def _prompt_logprobs(self, seq: Sequence, logits, rows: range) -> list[TokenLogprob]:
        first = seq.num_computed_tokens + rows.start
        targets = seq.token_ids[first + 1:first + 1 + len(rows)]
        return sampler.compute_logprobs(logits, targets, [seq.params.prompt_logprobs] * len(rows))

    def _banned(self, seq: Sequence) -> list[int]:
        if seq.num_output_tokens >= seq.params.min_tokens:
            return []
        return list(seq.params.stop_token_ids) + ([] if seq.params.ignore_eos else list(self.eos_token_ids))

    def _append(self, seq: Sequence, token: int, logprob: TokenLogprob | None, now: float) -> None:
        seq.token_ids.append(token)
        self.stats.generation_tokens_total += 1
        if seq.metrics.first_token_time is None:
            seq.metrics.first_token_time = now
            self.stats.time_to_first_token.observe(now - seq.metrics.arrival_time)
        elif seq.last_token_time is not None:
            self.stats.inter_token_latency.observe(now - seq.last_token_time)
        seq.last_token_time = now
        if logprob is not None:
            seq.logprobs.append(logprob)
        p = seq.params
        may_stop = seq.num_output_tokens >= p.min_tokens
        if may_stop and not p.ignore_eos and token in self.eos_token_ids:
            return self._finish(seq, "stop", flush=True)
        if may_stop and token in p.stop_token_ids:
            return self._finish(seq, "stop", stop_reason=token, flush=True)
        old_len = len(seq.text)
        seq.text += seq.detokenizer.add([token])
        if may_stop and p.stop and self._check_stop_strings(seq, old_len):
            return
        if seq.grammar is not None:
            seq.grammar.advance(token)
            if seq.grammar.finished:   # the output is complete: no need to sample an EOS
                return self._finish(seq, "stop", flush=True)
        if seq.num_output_tokens >= p.max_tokens or len(seq) >= self.max_model_len:
            self._finish(seq, "length", flush=True)

    def _check_stop_strings(self, seq: Sequence, old_len: int) -> bool:
        longest = max(len(s) for s in seq.params.stop)
        search_from = max(0, old_len - longest + 1)
        best = None
        for s in seq.params.stop:
            i = seq.text.find(s, search_from)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return False
        i, s = best
        seq.text = seq.text[:i + len(s)] if seq.params.include_stop_str_in_output else seq.text[:i]
        self._finish(seq, "stop", stop_reason=s)
        return True

    def _finish(self, seq: Sequence, reason: str, stop_reason=None, flush: bool = False) -> None:
        if flush:
            seq.text += seq.detokenizer.flush()
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        if seq.status != SequenceStatus.FINISHED:
            self.scheduler.remove(seq)
            if self.drafter is not None:
                self.drafter.release(seq)
        seq.status = SequenceStatus.FINISHED
        now = time.time()
        seq.metrics.finished_time = now
        if reason != "abort":
            self.stats.e2e_request_latency.observe(now - seq.metrics.arrival_time)
        self.stats.request_success_total[reason] = self.stats.request_success_total.get(reason, 0) + 1

    def _sendable_text(self, seq: Sequence) -> int:
        """How much of seq.text may go out: all of it once finished; before that, hold back a tail
        that could still turn out to be the start of a stop string."""
        if seq.is_finished or not seq.params.stop:
            return len(seq.text)
        text = seq.text
        hold = 0
        for k in range(min(len(text), max(len(s) for s in seq.params.stop) - 1), 0, -1):
            if any(s.startswith(text[-k:]) for s in seq.params.stop):
                hold = k
                break
        return len(text) - hold

    def _make_output(self, req: Request) -> RequestOutput:
        outs = []
        for seq in req.seqs:
            upto = self._sendable_text(seq)
            outs.append(CompletionOutput(
                index=seq.index, text=seq.text[:upto], token_ids=seq.output_token_ids,
                logprobs=seq.logprobs, finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
                delta_text=seq.text[seq.num_text_sent:upto],
                delta_token_ids=seq.output_token_ids[seq.num_tokens_sent:],
                delta_logprobs=None if seq.logprobs is None else seq.logprobs[seq.num_logprobs_sent:]))
            seq.num_text_sent = max(seq.num_text_sent, upto)
            seq.num_tokens_sent = seq.num_output_tokens
            seq.num_logprobs_sent = len(seq.logprobs or [])
        finished = req.finished
        if finished and not req.aborted:
            self.requests.pop(req.request_id, None)
        first = req.seqs[0]
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs, finished,
                             num_cached_tokens=first.num_cached_tokens, metrics=req.metrics,
                             prompt_logprobs=first.prompt_logprobs)

    def _update_stats(self, batch: ScheduledBatch) -> None:
        st, bm = self.stats, self.block_manager
        with st.lock:
            st.num_steps += 1
            st.num_running = len(self.scheduler.running)
            st.num_waiting = len(self.scheduler.waiting)
            st.kv_blocks_cached = len(bm.cached)
            st.kv_blocks_free = len(bm.free)
            st.kv_blocks_used = bm.num_blocks - len(bm.cached) - len(bm.free)
            st.num_preemptions_total += batch.num_preempted
            decode = batch.num_decode + batch.num_draft
            st.last_step = StepStats(st.num_running, st.num_waiting, batch.num_tokens - decode, decode,
                                     batch.num_preempted)
            for seq, looked_up in batch.admitted:
                if seq.metrics.first_scheduled_time is None:
                    seq.metrics.first_scheduled_time = time.time()
                st.prefix_cache_queries_total += looked_up
                st.prefix_cache_hits_total += seq.num_cached_tokens
        if self.config.log_stats_interval and time.monotonic() - self._last_log >= self.config.log_stats_interval:
            self._last_log = time.monotonic()
            log.info("%s", st.log_line())

