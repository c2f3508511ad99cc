"""Supervised / instruction fine-tuning: batch → summed next-token loss. The loop does the rest.

Loss: Σ over trained tokens of −log p(y_t | y_<t, x), divided by the global step's token
count inside the loop. By default the head and cross-entropy run chunk by chunk on the
labelled positions only (`losses.language_modeling`), so [batch, seq, vocab] logits are
never built and prompt/padding positions never reach the head.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from posttrain.config import SFTConfig, validate_sft
from posttrain.data.records import IGNORE_INDEX, Example
from posttrain.errors import ConfigError


class CausalLMLoss(torch.nn.Module):
    """Wraps a causal LM so that forward(batch) returns the summed token loss.

    Wrapping (rather than calling submodules from outside) keeps DDP and autocast working:
    accelerate prepares this module, so its forward is the one they hook.
    """

    def __init__(self, model: torch.nn.Module, loss: str = "auto", chunk_size: int = 256):
        super().__init__()
        from posttrain.models.loading import _unsupported_reason

        self.model = model
        reason = _unsupported_reason(model)
        if loss == "auto":
            loss = "chunked" if reason is None else "plain"
        elif loss == "chunked" and reason is not None:
            raise ConfigError(f"train.loss=chunked needs a plain linear output layer: {reason}; use train.loss=plain")
        self.loss_kind = loss
        self.chunk_size = chunk_size

    def forward(self, input_ids, labels, attention_mask=None, position_ids=None) -> torch.Tensor:
        from posttrain.losses.language_modeling import (
            chunked_linear_cross_entropy,
            cross_entropy_sum,
            shift_for_causal_lm,
        )
        from posttrain.data.batching import padded_inputs
        from posttrain.models.loading import final_hidden_and_head

        if position_ids is not None:  # packed rows: their positions mark the sequences
            inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        else:
            # A right-padded batch drops its mask: causal attention already hides the tail from every
            # real token, and SDPA takes its causal kernel instead of materialising a [B, 1, T, T]
            # mask (faster, ~20% less peak memory). Other rows count positions over real tokens.
            inputs = padded_inputs(input_ids, attention_mask)
        if self.loss_kind == "plain":
            logits = self.model(**inputs, use_cache=False).logits
            return cross_entropy_sum(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
        hidden, weight, bias = final_hidden_and_head(self.model, **inputs)
        selected, targets = shift_for_causal_lm(hidden, labels)
        return chunked_linear_cross_entropy(selected, weight, targets, bias=bias, chunk_size=self.chunk_size)


class SFTStage:
    """Micro-batches of token examples for the loop (in memory or streamed)."""

    def __init__(self, module, train: list[Example] | None, eval_examples: list[Example], cfg: SFTConfig,
                 pad_id: int, stream=None, adapter_training=None, forgetting=None):
        self.module = module
        if adapter_training is not None:  # LoRA+ rates and staged unfreezing (models.adapters.schedule)
            self.lr_scale = adapter_training.lr_scale
            self.inactive_parameters = adapter_training.inactive_parameters
        self.train_examples = train
        self.eval_examples = eval_examples
        self.cfg = cfg
        self.pad_id = pad_id
        self.stream = stream  # callable returning a fresh example iterator, when streaming
        self.on_checkpoint = None  # called as each checkpoint is saved (train.loop)
        self.forgetting = None
        from posttrain.train.forgetting import attach

        attach(self, forgetting)  # forgetting.*: retain loss, penalties, retain terms, gradual unfreezing

    def _collate(self, examples: list[Example]):
        from posttrain.data.batching import collate, collate_packed

        if self.cfg.data.packing:
            return collate_packed(examples, self.pad_id)
        return collate(examples, self.pad_id)

    def micro_batches(self, epoch: int) -> Iterator[dict]:
        from posttrain.data.batching import plan_batches

        size = self.cfg.train.batch_size
        if self.stream is not None:
            yield from self._streamed(size)
            return
        lengths = [len(e) for e in self.train_examples]
        plan = plan_batches(lengths, size, seed=self.cfg.train.seed, epoch=epoch, shuffle=True,
                            group_by_length=self.cfg.data.group_by_length)
        for indices in plan:
            yield self._collate([self.train_examples[i] for i in indices])

    def _streamed(self, size: int) -> Iterator[dict]:
        """The stream in file order, `size` examples a micro-batch, or under data.packing `size`
        packed rows (`pack_stream`: as many rows as in-memory packing gives a micro-batch)."""
        from posttrain.data.batching import pack_stream

        if self.cfg.data.packing:
            for rows in pack_stream(self.stream(), size, self.cfg.data.max_length):
                yield self._collate(rows)
            return
        buffer: list[Example] = []
        for example in self.stream():
            buffer.append(example)
            if len(buffer) == size:
                yield self._collate(buffer)
                buffer = []
        if buffer:
            yield self._collate(buffer)

    def micro_batches_per_epoch(self) -> int | None:
        if self.stream is not None:
            return None
        return -(-len(self.train_examples) // self.cfg.train.batch_size)

    def weight(self, batch) -> float:
        return float((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def tokens(self, batch) -> int:
        if "attention_mask" in batch:
            return int(batch["attention_mask"].sum())
        from posttrain.data.batching import packed_real_tokens

        return packed_real_tokens(batch, self.pad_id)

    def eval_micro_batches(self) -> list[dict]:
        size = self.cfg.train.batch_size
        return [self._collate(self.eval_examples[i : i + size]) for i in range(0, len(self.eval_examples), size)]


def build_model(cfg: SFTConfig, log, run_dir: Path | None = None):
    """Tokenizer, trainable model (full, freeze tuning or adapters) and its AdapterTraining. A
    data.max_length past the model's positions is a ConfigError (`loading.check_positions`)."""
    from posttrain.models.adapters import apply_adapters, format_report, parameter_report, plan_adapters
    from posttrain.models.adapters.schedule import AdapterTraining
    from posttrain.models.lean import lean_activations
    from posttrain.models.loading import check_positions, load_model, load_tokenizer
    from posttrain.train.optim import freeze_by_pattern

    plan = plan_adapters(cfg.adapter)
    tokenizer = load_tokenizer(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    model = load_model(cfg.model, quantization=cfg.adapter.quantization if plan.quantized else None)
    model = apply_adapters(model, cfg.adapter, plan=plan)
    if hasattr(cfg.data, "max_length"):  # sft, dpo; the RL stages check their rollouts (`rollouts.start_rl_run`)
        check_positions(model, {"data.max_length": cfg.data.max_length})  # virtual tokens in place: they count
    lean_activations(model, cfg.model.lean_activations)  # again: the adapters' LoRA linears
    if cfg.train.freeze:
        _check_tied_names(model, cfg.train.freeze)
        freeze_by_pattern(model, cfg.train.freeze)
    report = parameter_report(model, cfg.train.optimizer)
    log(format_report(report))
    if run_dir is not None:
        (run_dir / "params.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    return tokenizer, model, AdapterTraining(model, plan, cfg.adapter.lora.lr_ratio_b, log)


def _check_tied_names(model, patterns: list[str]) -> None:
    """A train.freeze pattern that names only the second name of a shared tensor (a tied
    lm_head.weight, which named_parameters lists under the input embedding's name) matches no
    parameter; say what it is tied to, rather than that it matches nothing."""
    import fnmatch

    from posttrain.train.optim import input_embedding_parameters

    first = {id(p): name for name, p in model.named_parameters()}
    embedding = input_embedding_parameters(model)
    for pattern in patterns:
        if any(fnmatch.fnmatch(name, pattern) for name in first.values()):
            continue
        for name, param in model.named_parameters(remove_duplicate=False):
            if fnmatch.fnmatch(name, pattern) and first.get(id(param), name) != name:
                owner = ("the input embedding " if id(param) in embedding else "") + first[id(param)]
                raise ConfigError(f"train.freeze pattern {pattern!r}: {name} is tied to {owner} (one tensor); "
                                  f"freezing {first[id(param)]!r} freezes both")


def check_packing(model) -> None:
    """Refuse `data.packing` for a model that attends across packed sequences.

    Packed rows carry no attention mask; transformers reads the boundaries from the position
    ids that restart at each sequence — but only models built on its shared mask functions do
    (Llama, Qwen, Mistral, Gemma, GPT-2, ...); OPT, Bloom, MPT and BioGPT make their own masks
    and would let every example see the ones before it. Test it: one sequence after two
    different ones of the same length must come out bitwise the same (masked scores add exact
    zeros), whatever the dtype; any leak moves it."""
    device = next(model.parameters()).device
    second = [9, 10, 11, 12]
    outputs = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for first in ([5, 6, 7], [8, 3, 4]):
                ids = torch.tensor([first + second], device=device)
                positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3]], device=device)
                outputs.append(model(input_ids=ids, position_ids=positions, use_cache=False).logits[0, 3:].float())
    finally:
        model.train(was_training)
    if not torch.allclose(outputs[0], outputs[1], rtol=1e-5, atol=1e-5):
        kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise ConfigError(f"data.packing: this model ({kind}) attends across packed sequences (it does not read "
                          "their boundaries from position ids); set data.packing=false")


def run_sft(cfg: SFTConfig) -> Path:
    """Fine-tune per `cfg`; returns the run directory (final model in run_dir/final)."""
    from posttrain.data.batching import pack
    from posttrain.data.pipeline import (StreamCounts, prepare_sft_data, prepare_streamed_eval, stream_sft_examples,
                                         write_stream_counts)
    from posttrain.models.loading import note_full_logits
    from posttrain.train.loop import train
    from posttrain.train.runs import finish_run, released_on_failure, run_fingerprint, start_run

    cfg = SFTConfig.for_run(cfg, "run_sft")
    validate_sft(cfg)
    run_dir, accelerator, main, log = start_run(cfg)
    with released_on_failure(run_dir):
        tokenizer, model, adapter_training = build_model(cfg, log, run_dir if main else None)
        pad_id = tokenizer.pad_token_id
        if cfg.data.packing:
            check_packing(model)
        note_full_logits(model, log)
        counts = None
        if cfg.data.streaming:  # validate_sft saw train.max_steps set
            data, train_examples, counts = None, None, StreamCounts()
            writes = run_dir if main else None  # every process reads the data; the main one writes its reports
            stream = lambda: stream_sft_examples(cfg.data, tokenizer, writes, log, counts)  # noqa: E731
            eval_examples = prepare_streamed_eval(cfg.data, tokenizer, writes, log)
        else:
            data = prepare_sft_data(cfg.data, tokenizer, run_dir if main else None, cfg.train.seed, log)
            train_examples, eval_examples, stream = data.train, data.eval, None
        from posttrain.train.forgetting import build_control, mix_replay, report

        control = build_control(cfg, tokenizer, model, accelerator, run_dir if main else None, log, cfg.train.loss)
        retain = control.retain if control is not None else None
        if retain is not None and cfg.forgetting.replay_ratio > 0:
            train_examples = mix_replay(train_examples, retain.pool, cfg.forgetting.replay_ratio, cfg.train.seed, log)
        if data is not None and cfg.data.packing:
            examples = len(train_examples)
            train_examples = pack(train_examples, cfg.data.max_length)
            log(f"packing: {examples} examples into {len(train_examples)} rows of ≤{cfg.data.max_length} tokens")
        module = CausalLMLoss(model, cfg.train.loss, cfg.train.loss_chunk_size)
        stage = SFTStage(module, train_examples, eval_examples, cfg, pad_id, stream, adapter_training, control)
        if counts is not None and main:  # what the stream has cut and dropped: at each checkpoint, and at the end
            stage.on_checkpoint = lambda: write_stream_counts(run_dir, counts, cfg.data)
        summary = {"loss_impl": module.loss_kind}
        summary.update(_exact_match(cfg, model, tokenizer, data, "before") if main else {})
        summary.update(report(cfg, control, model, tokenizer, "before", cfg.eval.max_new_tokens, main))
        try:
            result = train(stage, cfg.train, run_dir, accelerator, run_fingerprint(cfg))
        finally:  # also when the run stops early (a signal, a non-finite abort): the rows read until then
            if counts is not None and main:
                write_stream_counts(run_dir, counts, cfg.data)
        summary.update(result.summary(), eval_loss=result.eval_loss)
        trained = result.module.model
        summary.update(_exact_match(cfg, trained, tokenizer, data, "after") if main else {})
        summary.update(report(cfg, control, trained, tokenizer, "after", cfg.eval.max_new_tokens, main))
        return finish_run(run_dir, accelerator, main, trained, tokenizer, summary)


def _exact_match(cfg: SFTConfig, model, tokenizer, data, when: str) -> dict:
    """Exact match on held-out synthetic prompts (the demo's before/after figure)."""
    records = data.eval_records if data is not None else []
    return exact_match_report(model, tokenizer, records, cfg.eval.exact_match_prompts, cfg.data.template,
                              cfg.eval.max_new_tokens, when)


def exact_match_report(model, tokenizer, records, n: int, template: str, max_new_tokens: int, when: str,
                       name: str = "exact_match", prompts: str = "held-out prompts") -> dict:
    """Greedy answers to the first `n` records with an answer (an assistant turn) scored against it;
    prints one line. Summary keys NAME_WHEN, NAME_WHEN_by_task, NAME_prompts (the prompts scored).
    With none to score the line says n/a and why, and only NAME_prompts = 0 is returned: a score
    over no prompt is no figure, and 0.0% would read as a model that got every answer wrong.
    A prompt that fills the model's positions (`loading.position_limit`) is left out and counted:
    generation refuses it, and the run has trained by then."""
    if n <= 0:
        return {}
    from posttrain.data.templates import resolve_template
    from posttrain.eval.exact_match import answered, exact_match

    label = f"{name.replace('_', ' ')} {when} training"
    template = resolve_template(tokenizer, template)
    first = answered(records)[:n]
    scored = _fitting_prompts(model, tokenizer, template, first)
    left_out = f"; {len(first) - len(scored)} left out, their prompts past the model's positions" \
        if len(scored) < len(first) else ""
    if not scored:
        if not records:
            why = f"no {prompts}"
        elif not first:
            why = (f"none of the {len(records)} {prompts} has a text answer (a last assistant turn with no tool "
                   f"calls or reasoning) to score against")
        else:
            why = f"every one of the {len(first)} {prompts} is past the model's positions"
        print(f"{label}: n/a ({why})", flush=True)
        return {f"{name}_prompts": 0}
    scores = exact_match(model, tokenizer, template, scored, max_new_tokens=max_new_tokens)
    per_task = ", ".join(f"{task} {value:.0%}" for task, value in scores.items() if task != "all")
    print(f"{label}: {scores['all']:.1%} on {len(scored)} {prompts}" + (f" ({per_task})" if per_task else "")
          + left_out, flush=True)
    return {f"{name}_{when}": scores["all"], f"{name}_{when}_by_task": scores, f"{name}_prompts": len(scored)}


def _fitting_prompts(model, tokenizer, template: str, records: list) -> list:
    """The answered `records` whose rendered prompt leaves the model room for a token
    (`rollout.generate.completion_budgets` refuses the others)."""
    from posttrain.eval.exact_match import prompts_and_answers
    from posttrain.models.loading import position_limit
    from posttrain.rollout.generate import prompt_token_ids

    limit = position_limit(model)
    if limit is None:
        return records
    prompts = prompts_and_answers(records, template, tokenizer)[0]
    return [r for r, p in zip(records, prompts) if len(prompt_token_ids(tokenizer, p, raw=False)) < limit]
