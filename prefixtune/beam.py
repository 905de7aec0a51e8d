"""Beam search that stops computing a batch row once its result is final.

transformers' beam search (``GenerationMixin._beam_search``) runs every row of a batch until the
last one is done. A row is final once its early-stop heuristic says that no running beam can beat
its finished ones: from then on transformers pushes all its new candidates down by 1e9, so its
finished beams never change, yet its running beams keep being computed. On the E2E test tables
(beam 5, batches of 48, a trained prefix) that is ~30% of all row-steps; more for outputs of
uneven length.

:func:`beam_search` is transformers' loop, with its own helper methods in the same order, plus two
changes. The prompt pass runs each prompt once and copies its cache rows to the beams (transformers
runs the num_beams identical copies). After each step the final rows leave the batch (their beams,
cache rows, attention mask rows and prefix rows), and their sequences are kept aside. A cache layer's
beam reorder waits for its next update, which gathers the reordered rows straight into the grown
tensor (one copy of the cache per step instead of two; same tensors). The step's float32 scores are
written into two buffers kept for the whole call (same kernels, same values; 0.92x the CPU time:
results/perf/beam_score_buffers.json). In float32 the
outputs are transformers' (tests/test_beam.py: the decoder-only architectures; tests/test_smollm2.py).
In bfloat16 a smaller batch rounds its matrix products differently, so near-ties can resolve
differently, as with any change of batch size (3 of 192 E2E test outputs of a trained prefix,
BLEU 64.37 vs 64.47: results/perf/beam_rows.json).

It is passed to ``generate`` as ``custom_generate`` by :func:`prefixtune.generate` for beam search
without sampling. Anything else it hands to transformers' own beam search unchanged:
encoder-decoder models, output dicts, synced GPUs, and logits processors, stopping criteria or
model inputs that could keep per-row state it does not know how to shrink.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer
from transformers.generation import logits_process as lp
from transformers.generation import stopping_criteria as sc
from transformers.generation.utils import GenerationMixin

# Processors and criteria that look only at each row's own tokens (no state across steps or rows),
# so they give the same result on a smaller batch.
ROW_LOCAL = (lp.MinLengthLogitsProcessor, lp.MinNewTokensLengthLogitsProcessor, lp.NoRepeatNGramLogitsProcessor,
             lp.RepetitionPenaltyLogitsProcessor, lp.NoBadWordsLogitsProcessor, lp.SuppressTokensLogitsProcessor,
             lp.SuppressTokensAtBeginLogitsProcessor, lp.ForcedEOSTokenLogitsProcessor, lp.InfNanRemoveLogitsProcessor,
             sc.MaxLengthCriteria, sc.EosTokenCriteria, sc.StopStringCriteria)
# Model inputs this loop knows (anything else: transformers' loop): per-row tensors it shrinks, and
# settings that do not depend on the rows.
PER_ROW = ("attention_mask", "position_ids")
KNOWN = {*PER_ROW, "cache", "cache_position", "use_cache", "logits_to_keep", "prefix_batch"}

_HF = GenerationMixin
# False: the cache is reordered at once (index_select) and grown by torch.cat, as in transformers (for benchmarks)
GATHER_ON_UPDATE = True
# A step's float32 scores ([rows, vocab], three times) go into two buffers allocated once per call.
# Fresh tensors of that size come as fresh pages from the kernel, whose page faults were ~7% of a
# bfloat16 E2E decoding on CPU; the kernels and values are the same. False: fresh tensors (benchmarks).
REUSE_SCORE_BUFFERS = True


class _GatherOnUpdate(DynamicLayer):
    """A DynamicLayer whose beam reorder waits for its next update, which gathers the reordered rows
    straight into the grown tensor: one copy of the cache per decoding step where reorder_cache
    (index_select) and update (torch.cat) make two. The tensors are the same."""

    rows = None  # the pending reorder: new row i is the current row rows[i]

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        if self.get_seq_length() > 0:
            idx = beam_idx.to(self.keys.device)
            self.rows = idx if self.rows is None else self.rows[idx]

    def update(self, key_states, value_states, *args, **kwargs):
        if self.rows is None:
            return super().update(key_states, value_states, *args, **kwargs)
        self.keys, self.values = _gather_cat(self.keys, self.rows, key_states), _gather_cat(self.values, self.rows, value_states)
        self.rows = None
        return self.keys, self.values


def _gather_cat(old: torch.Tensor, rows: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``torch.cat([old.index_select(0, rows), new], dim=-2)``, copying ``old`` once."""
    length = old.shape[-2]
    out = old.new_empty(len(rows), *old.shape[1:-2], length + new.shape[-2], old.shape[-1])
    torch.index_select(old, 0, rows, out=out[..., :length, :])
    out[..., length:, :] = new
    return out


def supported(model, logits_processor, stopping_criteria, generation_config, synced_gpus, model_kwargs) -> bool:
    """Whether :func:`beam_search` may retire rows here (else it runs transformers' loop)."""
    g = generation_config
    return (not model.config.is_encoder_decoder and not synced_gpus and not g.do_sample
            and not (g.return_dict_in_generate or g.output_scores or g.output_logits or g.output_attentions
                     or g.output_hidden_states) and g.prefill_chunk_size is None
            and all(type(p) in ROW_LOCAL for p in [*logits_processor, *stopping_criteria])
            and set(model_kwargs) <= KNOWN
            and all(model_kwargs.get(k) is None or model_kwargs[k].ndim == 2 for k in PER_ROW)
            and (model_kwargs.get("cache") is None or hasattr(model_kwargs["cache"], "reorder_cache")))


@torch.no_grad()
def beam_search(model, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus=False,
                **model_kwargs):
    """transformers' ``_beam_search`` (same arguments, same result), with final rows retired."""
    if not supported(model, logits_processor, stopping_criteria, generation_config, synced_gpus, model_kwargs):
        return _HF._beam_search(model, input_ids, logits_processor, stopping_criteria, generation_config,
                                synced_gpus=synced_gpus, **model_kwargs)
    g = generation_config
    pad, eos = g._pad_token_tensor, g._eos_token_tensor
    num_beams, max_length = g.num_beams, g.max_length
    batch, prompt_len = input_ids.shape[0] // num_beams, input_ids.shape[1]
    cur_len, dev = prompt_len, input_ids.device
    beams_to_keep = max(2, 1 + (eos.shape[0] if eos is not None else 0)) * num_beams
    top_num_beam_mask = torch.cat((torch.ones(num_beams, dtype=torch.bool),
                                   torch.zeros(beams_to_keep - num_beams, dtype=torch.bool))).to(dev)
    fill = pad or eos[0] if eos is not None else -1  # transformers' own precedence
    running_sequences = torch.full((batch, num_beams, max_length), fill, dtype=torch.int64, device=dev)
    running_sequences[:, :, :cur_len] = _HF._unflatten_beam_dim(input_ids, batch, num_beams)
    sequences = running_sequences.clone()
    running_beam_scores = torch.zeros((batch, num_beams), dtype=torch.float, device=dev)
    running_beam_scores[:, 1:] = -1e9
    beam_scores = torch.full((batch, num_beams), -1e9, dtype=torch.float, device=dev)
    is_sent_finished = torch.zeros((batch, num_beams), dtype=torch.bool, device=dev)
    unsatisfied = torch.ones((batch, 1), dtype=torch.bool, device=dev)  # is_early_stop_heuristic_unsatisfied
    running_beam_indices = torch.full((batch, num_beams, max_length - cur_len), -1, dtype=torch.int32, device=dev)
    beam_indices = running_beam_indices.clone()
    # final rows: their sequences and beam indices, by input row
    final_sequences, final_beam_indices = sequences.clone(), beam_indices.clone()
    alive = torch.arange(batch, device=dev)  # the input row of each row still in the batch
    buffers = None  # the float32 scores of a step (REUSE_SCORE_BUFFERS)

    # Prefill: transformers runs the num_beams copies of each prompt (identical rows); run one per
    # input row and copy its cache rows to the beams.
    one = {k: v[::num_beams] if k in PER_ROW and v is not None else v for k, v in model_kwargs.items()}
    outputs = model._prefill(input_ids[::num_beams], g, one, is_first_iteration=True)
    beams = torch.arange(batch, device=dev).repeat_interleave(num_beams)
    if model_kwargs.get("cache") is not None:
        for layer in getattr(model_kwargs["cache"], "layers", ()) if GATHER_ON_UPDATE else ():
            if type(layer) is DynamicLayer:  # (sliding-window and other layers reorder at once)
                layer.__class__ = _GatherOnUpdate  # same state, one more attribute with a default
        model_kwargs["cache"].reorder_cache(beams)
    logits, flat = outputs.logits[:, -1, :][beams], input_ids
    while True:
        if logits is None:
            flat = _HF._flatten_beam_dim(running_sequences[:, :, :cur_len])
            inputs = model.prepare_inputs_for_generation(
                flat, next_sequence_length=1 if model_kwargs["use_cache"] else None, **model_kwargs)
            outputs = model(**inputs, return_dict=True)
            logits = outputs.logits[:, -1, :]
        model_kwargs = model._update_model_kwargs_for_generation(outputs, model_kwargs, is_encoder_decoder=False)
        if REUSE_SCORE_BUFFERS:
            if buffers is None:  # rows only shrink: the first step's shape holds every later step's
                buffers = [torch.empty(logits.shape, dtype=torch.float32, device=dev) for _ in range(2)]
            scores = buffers[0][: len(logits)].copy_(logits)
            log_probs = torch.log_softmax(scores, dim=-1, out=buffers[1][: len(logits)])
        else:
            log_probs = torch.nn.functional.log_softmax(logits.to(copy=True, dtype=torch.float32, device=dev), dim=-1)
        del outputs
        log_probs = logits_processor(flat, log_probs)
        logits = None
        log_probs = _HF._unflatten_beam_dim(log_probs, batch, num_beams).add_(running_beam_scores[:, :, None])
        log_probs = log_probs.reshape(batch, -1)
        topk_log_probs, topk_running_sequences, topk_running_beam_indices = model._get_top_k_continuations(
            accumulated_log_probs=log_probs, running_sequences=running_sequences,
            running_beam_indices=running_beam_indices, cur_len=cur_len, decoder_prompt_len=prompt_len,
            do_sample=False, beams_to_keep=beams_to_keep, num_beams=num_beams, batch_size=batch)
        hits = stopping_criteria(_HF._flatten_beam_dim(topk_running_sequences[:, :, : cur_len + 1]), None)
        hits = _HF._unflatten_beam_dim(hits, batch, beams_to_keep)
        running_sequences, running_beam_scores, running_beam_indices = model._get_running_beams_for_next_iteration(
            topk_log_probs=topk_log_probs, topk_running_sequences=topk_running_sequences,
            topk_running_beam_indices=topk_running_beam_indices, next_token_hits_stopping_criteria=hits,
            num_beams=num_beams)
        sequences, beam_scores, beam_indices, is_sent_finished = model._update_finished_beams(
            sequences=sequences, topk_running_sequences=topk_running_sequences, beam_scores=beam_scores,
            topk_log_probs=topk_log_probs, beam_indices=beam_indices,
            topk_running_beam_indices=topk_running_beam_indices, is_early_stop_heuristic_unsatisfied=unsatisfied,
            is_sent_finished=is_sent_finished, next_token_hits_stopping_criteria=hits,
            top_num_beam_mask=top_num_beam_mask, num_beams=num_beams, cur_len=cur_len,
            decoder_prompt_len=prompt_len, length_penalty=g.length_penalty, early_stopping=g.early_stopping)
        beam_idx = _HF._flatten_beam_dim(running_beam_indices[..., cur_len - prompt_len])
        cur_len += 1
        unsatisfied = _HF._check_early_stop_heuristic(
            is_early_stop_heuristic_unsatisfied=unsatisfied, running_beam_scores=running_beam_scores,
            beam_scores=beam_scores, is_sent_finished=is_sent_finished, cur_len=cur_len, max_length=max_length,
            decoder_prompt_len=prompt_len, early_stopping=g.early_stopping, length_penalty=g.length_penalty)
        # transformers stops the whole batch when no row can improve, when every row's beams are full
        # and early_stopping is True, or when every candidate hit a stopping criterion
        done = ~unsatisfied[:, 0] | torch.all(hits, dim=-1)
        if g.early_stopping is True:
            done |= torch.all(is_sent_finished, dim=-1)
        if bool(done.all()):
            final_sequences[alive], final_beam_indices[alive] = sequences, beam_indices
            break
        # A done row is final: its candidates are pushed down by 1e9 from now on (_update_finished_beams),
        # or every one of them stops (its running beams sink by 1e9 and can no longer beat a finished one).
        keep = (~done).nonzero()[:, 0]
        if len(keep) < batch:
            gone = done.nonzero()[:, 0]
            final_sequences[alive[gone]], final_beam_indices[alive[gone]] = sequences[gone], beam_indices[gone]
            alive, batch = alive[keep], len(keep)
            (running_sequences, sequences, running_beam_scores, beam_scores, is_sent_finished, unsatisfied,
             running_beam_indices, beam_indices) = (t[keep] for t in (
                running_sequences, sequences, running_beam_scores, beam_scores, is_sent_finished, unsatisfied,
                running_beam_indices, beam_indices))
            flat_keep = (keep[:, None] * num_beams + torch.arange(num_beams, device=dev)).reshape(-1)
            beam_idx = beam_idx[flat_keep]  # one copy of the cache: reordered and shrunk at once
            for name in PER_ROW:  # one row per beam (a shared [1, ...] tensor stays as it is)
                t = model_kwargs.get(name)
                if t is not None and t.shape[0] == len(done) * num_beams:
                    model_kwargs[name] = t[flat_keep]
            if model_kwargs.get("prefix_batch") is not None:  # one row per input row (or 1)
                model_kwargs["prefix_batch"] = model_kwargs["prefix_batch"].select(keep)
        if model_kwargs.get("cache") is not None:
            model_kwargs["cache"].reorder_cache(beam_idx)

    # transformers' output: the best num_return_sequences beams, cut to the longest generated length
    n = g.num_return_sequences
    sequences = _HF._flatten_beam_dim(final_sequences[:, :n])
    generated = (_HF._flatten_beam_dim(final_beam_indices[:, :n]) + 1).bool().sum(dim=1).max()
    return sequences[:, : prompt_len + generated]
