"""Preference examples -> rendered pairs (or KTO completions) -> batches.

The row shapes and their parsing are pair_rows.py. Rendering goes through lorakit.data.render, the
one template function of sft and infer: the prompt is `render_prompt`'s ids exactly, and only the
final assistant turn carries loss.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from lorakit.data.loading import resolve_system, split_val
from lorakit.data.sources import _read_spec, parse_spec, raise_row_errors, sample_rows
from lorakit.data.packing import collate, shared_prefix_length, strip_prefix
from lorakit.data.render import IGNORE_INDEX, Rendered, render_conversations, render_prompt, set_chat_template
from lorakit.errors import UserError
from lorakit.rlhf.pair_rows import PreferenceExample, is_preference_row, parse_preference_row


@dataclass
class RenderedPair:
    """A prompt with both answers rendered; labels only on the final answer (and its end-of-turn)."""

    chosen: Rendered
    rejected: Rendered
    source: str
    ref_chosen: float | None = None  # the reference policy's summed log-prob, filled before training
    ref_rejected: float | None = None
    anchor: Rendered | None = None  # a replay anchor answer trained alongside (rlhf/anchor.py), and its weight
    anchor_weight: float = 0.0

    @property
    def length(self) -> int:
        """Tokens of both rows (what --group_by_length sorts by)."""
        return len(self.chosen.input_ids) + len(self.rejected.input_ids)

    @property
    def labels(self) -> list[int]:
        """The chosen row's labels (what the loop quotes when a step goes wrong)."""
        return self.chosen.labels


@dataclass
class RenderedCompletion:
    """A KTO example: one completion, whether it is desirable, and a mismatched one for the KL estimate."""

    completion: Rendered
    desirable: bool
    source: str
    kl: Rendered | None = None  # this prompt followed by another example's completion
    ref: float | None = None
    ref_kl: float | None = None
    anchor: Rendered | None = None  # as RenderedPair's
    anchor_weight: float = 0.0

    @property
    def length(self) -> int:
        return len(self.completion.input_ids)

    @property
    def labels(self) -> list[int]:
        return self.completion.labels


@dataclass
class PreferenceReport:
    """What happened to one dataset on its way to training (printed by rlhf and check-data)."""

    spec: str
    location: str
    role: str
    formats: dict[str, int]
    rows_read: int
    rows_sampled: int
    kept: int = 0
    train_rows: int = 0
    val_rows: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    truncated: int = 0
    errors: list[str] = field(default_factory=list)
    example: RenderedPair | RenderedCompletion | None = None


@dataclass
class PreferenceData:
    """Rendered training and validation examples, and a report per dataset."""

    train: list
    val: list
    reports: list[PreferenceReport]
    system: str | None = None


# ---- rendering: one template function for training and inference ----


def _final_turn_only(sample: Rendered, prompt_ids: list[int], source: str) -> Rendered:
    """Keep the labels of the last answer only; the prompt must render exactly as inference renders it."""
    n = len(prompt_ids)
    if sample.input_ids[:n] != prompt_ids:
        raise UserError(f"{source}: the chat template renders the prompt differently with and without the answer, "
                        "so the answer's tokens cannot be located; use --template chatml or a jinja file")
    return Rendered(input_ids=sample.input_ids, labels=[IGNORE_INDEX] * n + sample.labels[n:])


def render_examples(tokenizer, examples: list[PreferenceExample], *, system: str | None
                    ) -> list[tuple[list[int], Rendered | None, Rendered | None]]:
    """(prompt ids, rendered chosen, rendered rejected) per example, both batched through render_conversations."""
    sides = []
    for side in ("chosen", "rejected"):
        index = [i for i, ex in enumerate(examples) if getattr(ex, side) is not None]
        convs = [examples[i].prompt + [{"role": "assistant", "content": getattr(examples[i], side)}] for i in index]
        rendered = render_conversations(tokenizer, convs, system=system, sources=[examples[i].source for i in index])
        sides.append(dict(zip(index, rendered)))
    out = []
    for i, ex in enumerate(examples):
        prompt_ids = render_prompt(tokenizer, ex.prompt, system=system)
        chosen, rejected = (None if i not in side else _final_turn_only(side[i], prompt_ids, ex.source) for side in sides)
        out.append((prompt_ids, chosen, rejected))
    return out


def fit_length(sample: Rendered, prompt_len: int, max_length: int) -> Rendered:
    """The sample with its answer cut at the end so the whole is max_length tokens (the prompt stays whole)."""
    return Rendered(input_ids=sample.input_ids[:max_length], labels=sample.labels[:max_length])


@dataclass
class _Shaped:
    items: list
    dropped: Counter
    truncated: int
    errors: list[str]


def shape_examples(tokenizer, examples: list[PreferenceExample], *, system: str | None, max_length: int,
                   truncation_strategy: str, unpaired: bool) -> _Shaped:
    """Render, check lengths and build RenderedPair (or RenderedCompletion when `unpaired`, KTO) items.

    A prompt alone as long as --max_length is an error (file:line); an answer that does not fit is
    dropped (--truncation_strategy delete) or cut at its end (left/right); chosen == rejected is dropped
    and counted: it teaches nothing.
    """
    out = _Shaped([], Counter(), 0, [])
    for ex, (prompt_ids, chosen, rejected) in zip(examples, render_examples(tokenizer, examples, system=system)):
        if len(prompt_ids) >= max_length:
            out.errors.append(f"{ex.source}: the prompt alone is {len(prompt_ids)} tokens, no room for an answer "
                              f"within --max_length {max_length}; raise --max_length or shorten the prompt")
            continue
        if ex.is_pair and chosen.input_ids == rejected.input_ids:
            out.dropped["chosen == rejected (nothing to prefer)"] += 1
            continue
        sides = [s for s in (chosen, rejected) if s is not None]
        if any(len(s.input_ids) > max_length for s in sides):
            if truncation_strategy == "delete":
                out.dropped[f"longer than --max_length {max_length} (--truncation_strategy delete)"] += 1
                continue
            sides = [fit_length(s, len(prompt_ids), max_length) for s in sides]
            out.truncated += 1
            chosen, rejected = (sides if ex.is_pair else (sides[0], None) if chosen is not None else (None, sides[0]))
        if unpaired:
            out.items += [RenderedCompletion(s, s is chosen, ex.source) for s in (chosen, rejected) if s is not None]
        elif not ex.is_pair:
            out.errors.append(f"{ex.source}: a KTO row (one completion with a label) cannot train "
                              f"--rlhf_type dpo/orpo/simpo/cpo, which need a chosen and a rejected answer")
        else:
            out.items.append(RenderedPair(chosen, rejected, ex.source))
    return out


def prompt_length(sample: Rendered) -> int:
    """Tokens before the first labelled one (the prompt)."""
    return next((t for t, label in enumerate(sample.labels) if label != IGNORE_INDEX), len(sample.labels))


def attach_kl_completions(items: list[RenderedCompletion], batch_size: int) -> None:
    """KTO's KL estimate: each prompt with the completion of its neighbour in its chunk of `batch_size`.

    As TRL: within consecutive chunks, (x_1, y_1) ... (x_n, y_n) -> (x_1, y_n), (x_2, y_1), ...; a chunk
    of one pairs an example with its own completion.
    """
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        for k, item in enumerate(chunk):
            other = chunk[k - 1].completion
            n, m = prompt_length(item.completion), prompt_length(other)
            item.kl = Rendered(input_ids=item.completion.input_ids[:n] + other.input_ids[m:],
                               labels=[IGNORE_INDEX] * n + other.labels[m:])


# ---- loading ----


def load_preference_data(data_args, tokenizer, *, rlhf_type: str, batch_size: int, use_hf: bool = True,
                         template: str | None = None, strict: bool = True, log=print) -> PreferenceData:
    """Read, validate, render, length-check and split every --dataset/--val_dataset into pairs (KTO: completions).

    rlhf_type "kto" unpairs pairs into completions; "auto" (check-data) keeps each dataset as its rows are.
    """
    if not data_args.dataset:
        raise UserError("no training data: pass --dataset FILE_OR_ID [FILE_OR_ID ...] of preference rows")
    set_chat_template(tokenizer, template)
    system = resolve_system(data_args.system)
    train, val, reports = [], [], []
    for role, specs in (("train", data_args.dataset), ("val", data_args.val_dataset)):
        for text in specs:
            report, items = _load_one(text, role, tokenizer, data_args, system, rlhf_type, use_hf, strict)
            reports.append(report)
            if role == "val":
                val += items
                continue
            part_train, part_val = split_val(items, data_args.split_dataset_ratio or 0.0, data_args.seed)
            report.train_rows, report.val_rows = len(part_train), len(part_val)
            train += part_train
            val += part_val
    if strict and not train:
        raise UserError("zero training pairs left after loading and length checks; see the report above")
    if train and isinstance(train[0], RenderedCompletion):
        attach_kl_completions(train, batch_size)
        attach_kl_completions(val, batch_size)
    return PreferenceData(train=train, val=val, reports=reports, system=system)


def _load_one(text: str, role: str, tokenizer, data_args, system, rlhf_type: str, use_hf: bool, strict: bool):
    spec = parse_spec(text)
    rows, location = _read_spec(spec.name, use_hf=use_hf, model_name=data_args.model_name,
                                model_author=data_args.model_author)
    examples, errors, formats = [], [], Counter()
    for row, source in rows:
        try:
            ex = parse_preference_row(row, source)
        except UserError as e:
            errors.append(str(e))
            continue
        examples.append(ex)
        formats[ex.format] += 1
    # "auto" (check-data): KTO rows are shown as completions, pairs as pairs
    unpaired = rlhf_type == "kto" or (rlhf_type == "auto" and any(not ex.is_pair for ex in examples))
    if spec.n is not None and examples:
        examples = sample_rows(examples, spec.n, data_args.seed)
    shaped = shape_examples(tokenizer, examples, system=system, max_length=data_args.max_length,
                            truncation_strategy=data_args.truncation_strategy, unpaired=unpaired) if examples else None
    if shaped is not None:
        errors += shaped.errors
    if strict:
        raise_row_errors(errors, location)
    report = PreferenceReport(spec=text, location=location, role=role, formats=dict(formats), rows_read=len(rows),
                              rows_sampled=len(examples), errors=errors)
    items = shaped.items if shaped is not None else []
    if shaped is not None:
        report.dropped, report.truncated = dict(shaped.dropped), shaped.truncated
    report.kept = len(items)
    report.example = items[0] if items else None
    if strict and not items:
        raise UserError(f"{location}: zero examples left (read {len(rows)}, dropped {sum(report.dropped.values())}: "
                        + ("; ".join(f"{n} {why}" for why, n in report.dropped.items()) or "none") + ")")
    return report, items


# ---- batches ----


def collate_pairs(pairs: list[RenderedPair], pad_token_id: int, *, shared_prefix: bool = False,
                  anchors: bool = True) -> dict[str, torch.Tensor]:
    """Rows [chosen_1..chosen_B, rejected_1..rejected_B] in one batch (one forward for both sides), then the
    pairs' replay anchor rows (collate_with_anchors; anchors=False leaves them out: the reference pass).

    shared_prefix: the tokens every row starts with, the whole prompt for one pair, run once.
    Adds ref_chosen / ref_rejected [B] (fp32) once the reference log-probs are known.
    """
    out = collate_with_anchors([p.chosen for p in pairs] + [p.rejected for p in pairs], pairs if anchors else [],
                               pad_token_id, shared_prefix=shared_prefix)
    if all(p.ref_chosen is not None for p in pairs):
        out["ref_chosen"] = torch.tensor([p.ref_chosen for p in pairs], dtype=torch.float32)
        out["ref_rejected"] = torch.tensor([p.ref_rejected for p in pairs], dtype=torch.float32)
    return out


def collate_completions(items: list[RenderedCompletion], pad_token_id: int, *, shared_prefix: bool = False,
                        anchors: bool = True) -> dict[str, torch.Tensor]:
    """KTO rows: the completions (then their replay anchor rows, as collate_pairs), `desirable` [N] bool, and the
    KL rows under kl_* keys (with their references; no kl_* rows when every KL row is its own completion: the loss
    then reuses the completions' log-probs)."""
    out = collate_with_anchors([x.completion for x in items], items if anchors else [], pad_token_id,
                               shared_prefix=shared_prefix)
    out["desirable"] = torch.tensor([x.desirable for x in items], dtype=torch.bool)
    # KL rows that are the completions themselves (chunks of one: batch size 1) are not run twice
    if all(x.kl is not None for x in items) and not all(kl_is_own(x) for x in items):
        kl = collate([x.kl for x in items], pad_token_id, shared_prefix=shared_prefix)
        out.update({f"kl_{k}": v for k, v in kl.items()})
    if all(x.ref is not None for x in items):
        out["ref"] = torch.tensor([x.ref for x in items], dtype=torch.float32)
        out["ref_kl"] = torch.tensor([x.ref_kl for x in items], dtype=torch.float32)
    return out


def attach_anchors(items: list, samples: list[Rendered], *, every: int = 1) -> None:
    """Give every `every`-th item the next anchor sample (cycling), weighted `every` so the term's total
    weight per item stays one anchor answer per item; the others get none."""
    k = 0
    for i, item in enumerate(items):
        if samples and i % every == 0:
            item.anchor, item.anchor_weight = samples[k % len(samples)], float(every)
            k += 1
        else:
            item.anchor, item.anchor_weight = None, 0.0


def collate_with_anchors(rows: list[Rendered], items: list, pad_token_id: int, *,
                         shared_prefix: bool = False) -> dict[str, torch.Tensor]:
    """collate(rows) plus the replay anchor rows the items carry (rlhf/anchor.py) as the batch's last rows, and
    anchor_weight [A].

    One forward runs the anchor rows with the rest (a separate forward of a short row costs the GPU a whole pass
    of kernel launches: 160 ms against 17 ms of work on the 7B architecture); the GPU layers drop the padding,
    so a short row costs only its tokens. With shared_prefix the rows' common start is cut once (prefix_ids);
    the anchor rows, which do not continue it, are marked False in prefix_rows [R + A]."""
    anchors = [(x.anchor, x.anchor_weight) for x in items if getattr(x, "anchor", None) is not None]
    if not anchors:
        return collate(rows, pad_token_id, shared_prefix=shared_prefix)
    prefix = shared_prefix_length(rows) if shared_prefix else 0
    out = collate([strip_prefix(x, prefix) for x in rows] + [a for a, _ in anchors], pad_token_id)
    out["anchor_weight"] = torch.tensor([w for _, w in anchors], dtype=torch.float32)
    if prefix:
        out["prefix_ids"] = torch.tensor([rows[0].input_ids[:prefix]], dtype=torch.long)
        out["prefix_rows"] = torch.tensor([True] * len(rows) + [False] * len(anchors))
    return out


def joined_anchor_rows(batch: dict[str, torch.Tensor]) -> int:
    """How many of the batch's last rows are replay anchor rows (0 when it has none)."""
    return batch["anchor_weight"].shape[0] if "anchor_weight" in batch else 0


def anchor_rows(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch's anchor rows (its last rows) as a batch of their own: labels, teacher targets, weight."""
    joined = joined_anchor_rows(batch)
    rows = {k: batch[k][-joined:] for k in ("input_ids", "labels", "attention_mask", "position_ids", "teacher_ids",
                                           "teacher_probs") if k in batch}
    return rows | {"weight": batch["anchor_weight"]}


def kl_is_own(item: RenderedCompletion) -> bool:
    """The KL row is the completion itself (a chunk of one): its log-probs are the completion's."""
    kl = item.kl
    return kl is not None and kl.input_ids == item.completion.input_ids and kl.labels == item.completion.labels


def sub_batch(batch: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors of `batch` stored under `prefix` (e.g. the KL rows), with the prefix removed."""
    return {k[len(prefix):]: v for k, v in batch.items() if k.startswith(prefix)}


def holds_preference_rows(specs: list[str], *, use_hf: bool = True) -> bool:
    """True when the first dataset's first row is a preference (or KTO) row: check-data then shows pairs."""
    if not specs:
        return False
    try:
        rows, _ = _read_spec(parse_spec(specs[0]).name, use_hf=use_hf, model_name=(), model_author=())
    except UserError:
        return False  # the sft report names what is wrong with it
    return bool(rows) and is_preference_row(rows[0][0])


def count_pairs(batch: dict[str, torch.Tensor]) -> int:
    """Pairs in a collate_pairs batch: the unit a preference step's loss is averaged over."""
    return (batch["input_ids"].shape[0] - joined_anchor_rows(batch)) // 2


def count_completions(batch: dict[str, torch.Tensor]) -> int:
    """Completions in a collate_completions batch (KTO's unit)."""
    return batch["input_ids"].shape[0] - joined_anchor_rows(batch)
