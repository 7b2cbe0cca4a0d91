"""Visual instruction tuning (HiCur-NPC Stage II): train an ``InstructModel`` on conversations.

Training minimises the cross-entropy of the assistant's answers given the image(s) and the
questions (``InstructModel.forward``; every other token is masked). ``instruct.stage``
chooses what learns: ``projector`` (LLaVA stage A, captions or reports) or ``full`` (stage B,
projector + LM or its LoRA adapters). Conversations come from ``medalign.data.conversations``.

Evaluation on ``eval.split`` asks each conversation's first question and decodes the answer:

* **closed** questions (``attr:options`` lists the answers: yes/no, multiple choice, the
  phantom's count/side/zone/diagnosis) are scored by accuracy, overall and per ``attr:kind``;
  an answer counts as the option it names first (``choose``), none named is wrong;
* **open** answers by corpus BLEU-1..4 and ROUGE-L (``medalign.textmetrics``).

Next to the model, scored the same way: the **majority** baseline (the most frequent training
answer to the same question), the **retrieval** baseline (the answer that the nearest training
image, by the model's vision CLS embedding, gave to the same question), and the **untuned**
model (the model as the run starts: random, or its ``init_from`` bundle), so a run shows what
its training added. Answers are written to ``answers.jsonl``.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from medalign.config import RunConfig
from medalign.data.conversations import conversation_rows, turns_of
from medalign.data.dataset import Collator, Sample, dataset_for_model, stack_modalities
from medalign.data.manifest import Manifest
from medalign.models.instruct import IGNORE, IMAGE_TOKEN, with_placeholders
from medalign.progress import progress
from medalign.textmetrics import text_metrics

ANSWERS_FILE = "answers.jsonl"
UNTUNED_FILE = "untuned.json"


class InstructCollator:
    """Batches conversations: tokenised turns with answer-only labels, and the images in order.

    ``separate``: each present image column is its own image (several per conversation);
    otherwise the columns are stacked as channels of one image.
    """

    def __init__(self, model: Any, image_keys: Sequence[str], separate: bool, first_turn_only: bool = False):
        self.model, self.image_keys, self.separate = model, list(image_keys), separate
        self.first_turn_only = first_turn_only
        self.base = Collator()

    def conversation(self, sample: Sample) -> list[dict[str, str]]:
        where = f"case {sample['case_id']!r}"
        turns = turns_of(sample["attrs"].get("conversation", ""), where)
        if self.first_turn_only:
            turns = turns[:1]
        count = int(sample["modalities_present"].sum()) if self.separate else 1
        return with_placeholders(turns, count, where)

    def __call__(self, samples: Sequence[Sample]) -> Sample:
        batch = self.base(samples)
        encoded = [self.model.encode_conversation(self.conversation(s)) for s in samples]
        width = max(len(ids) for ids, _ in encoded)
        input_ids = torch.full((len(samples), width), self.model.pad_id, dtype=torch.long)
        labels = torch.full_like(input_ids, IGNORE)
        for row, (ids, row_labels) in enumerate(encoded):
            input_ids[row, : len(ids)], labels[row, : len(ids)] = torch.tensor(ids), torch.tensor(row_labels)
        batch.update(input_ids=input_ids, labels=labels)
        lengths = torch.tensor([len(ids) for ids, _ in encoded])
        batch["attention_mask"] = (torch.arange(width)[None] < lengths[:, None]).long()
        batch["pixel_values"] = self.images(batch)
        return batch

    def images(self, batch: Sample) -> torch.Tensor:
        """``[N_images, C, H, W]`` in placeholder order: row by row, column by column."""
        if not self.separate:
            return stack_modalities(batch, self.image_keys)
        present = batch["modalities_present"]
        return torch.stack(
            [
                batch[key][row]
                for row in range(len(present))
                for j, key in enumerate(self.image_keys)
                if present[row, j]
            ]
        )


class InstructTask:
    """Answer-token cross-entropy of the batch's conversations."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def training_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        out = self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
            labels=batch["labels"],
        )
        return {"loss": out["loss"]}


def prepare_model(model: Any, config: RunConfig) -> None:
    """Freeze what the stage does not train; LoRA and gradient checkpointing as the recipe asks."""
    settings = config.instruct
    if settings.lora and not model.has_lora:
        model.apply_lora(**settings.lora)
    model.set_trainable(projector=True, lm=settings.stage == "full", vision=settings.train_vision)
    if settings.gradient_checkpointing:
        model.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def run_instruct(config: RunConfig, *, resume: bool = False, echo: Any = print) -> Path:
    """``task: instruct``: tune an ``InstructModel`` through the engine, then evaluate it."""
    from medalign.models.instruct import InstructModel
    from medalign.run import build_model, fit_and_save, image_columns, prepare_run

    out, manifest = prepare_run(config)
    model = build_model(config, echo)
    if not isinstance(model, InstructModel):
        raise ValueError(
            f"task instruct needs an instruct model (instruct_tiny, ...), not {config.model.name!r}"
        )
    rows, summary = conversation_rows(manifest, config.instruct.conversations)
    image_keys = image_columns(config, rows)
    dataset = instruct_dataset(rows, model, config, image_keys, "train", augment=True)
    if len(dataset) == 0:
        raise ValueError("the manifest has no training conversation (split 'train')")
    untuned = untuned_metrics(model, rows, config, image_keys, out) if config.instruct.eval_untuned else None
    prepare_model(model, config)

    def evaluate(m: Any) -> dict[str, Any]:
        m.merge_lora()  # the bundle is a plain model; answers are the same with LoRA folded in
        metrics = evaluate_instruct(m, rows, config, image_keys, config.eval.split)
        metrics["conversations"] = summary
        if untuned is not None:
            metrics["untuned"] = untuned
        echo(headline(metrics))
        return metrics

    collate = InstructCollator(model, image_keys, config.instruct.images == "separate")
    return fit_and_save(
        config, out, model, InstructTask(model), dataset, evaluate, resume=resume, echo=echo, collate=collate
    )


def instruct_dataset(
    rows: Manifest, model: Any, config: RunConfig, image_keys: list[str], split: str, augment: bool = False
) -> Any:
    """A split of the conversation rows, preprocessed for the model (channels per image)."""
    import dataclasses

    data = config.data
    if config.instruct.images == "separate" and not data.channels:
        data = dataclasses.replace(data, channels=model.config.in_channels)
    return dataset_for_model(rows, model, split, None, image_keys, data=data, augment=augment)


def untuned_metrics(model: Any, rows: Manifest, config: RunConfig, image_keys: list[str], out: Path) -> dict:
    """The starting model's scores, computed once per run folder (a resumed run reads them back)."""
    path = out / UNTUNED_FILE
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    metrics = evaluate_instruct(
        model, rows, config, image_keys, config.eval.split, baselines=False, write=False
    )
    path.write_text(json.dumps(metrics, indent=2, default=float) + "\n", encoding="utf-8")
    return metrics


def headline(metrics: dict[str, Any]) -> str:
    parts = []
    for name in ("model", "untuned", "retrieval", "majority"):
        block = metrics.get(name) if name != "model" else metrics
        if block and block.get("closed"):
            parts.append(f"{name} closed accuracy {block['closed']['accuracy']:.3f}")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def normalise_answer(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def choose(answer: str, options: Sequence[str]) -> str | None:
    """The option a free-text answer names first (whole words), or None when it names none."""
    words = normalise_answer(answer).split()
    for word in words:
        if word in options:
            return word
    return None


def split_answers(
    model: Any, rows: Manifest, config: RunConfig, image_keys: list[str], split: str, generate: bool
) -> dict[str, list[Any]]:
    """Per conversation of a split: ids, first question, reference answer, kind, options, image
    embedding and (``generate``) the model's decoded answer."""
    settings = config.instruct
    dataset = instruct_dataset(rows, model, config, image_keys, split)
    if settings.max_eval_rows is not None and split == config.eval.split:
        dataset = torch.utils.data.Subset(dataset, range(min(settings.max_eval_rows, len(dataset))))
    collate = InstructCollator(model, image_keys, settings.images == "separate", first_turn_only=True)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=config.data.eval_batch_size, collate_fn=collate.base
    )
    out: dict[str, list[Any]] = defaultdict(list)
    model.eval()
    for batch in progress(loader, desc=f"answer {split}" if generate else f"embed {split}"):
        samples = [{k: v[i] for k, v in batch.items()} for i in range(len(batch["case_id"]))]
        prompts = [collate.conversation(s) for s in samples]
        pixels = collate.images(batch)
        for sample, prompt in zip(samples, prompts, strict=True):
            full = turns_of(sample["attrs"]["conversation"], f"case {sample['case_id']!r}")
            out["case_id"].append(sample["case_id"])
            out["question"].append(normalise_answer(prompt[0]["value"].replace(IMAGE_TOKEN, "")))
            out["reference"].append(
                next((t["value"] for t in full[1:] if t.get("from") in ("gpt", "assistant")), "")
            )
            out["kind"].append(sample["attrs"].get("kind", "open"))
            options = sample["attrs"].get("options", "")
            out["options"].append(tuple(options.split("|")) if options else ())
        out["embedding"].append(model.encode_image(stack_modalities(batch, image_keys)))
        if generate:
            out["generated"] += model.generate(
                prompts, pixels, max_new_tokens=settings.max_new_tokens, do_sample=settings.decoding == "sample",
                temperature=settings.temperature, top_p=settings.top_p,
                no_repeat_ngram_size=settings.no_repeat_ngram_size,
            )  # fmt: skip
    return out


def score_answers(
    references: Sequence[str],
    answers: Sequence[str],
    kinds: Sequence[str],
    options: Sequence[tuple[str, ...]],
) -> dict[str, Any]:
    """Closed-question accuracy (overall and per kind) and open-answer BLEU/ROUGE-L."""
    closed_right: dict[str, list[bool]] = defaultdict(list)
    open_refs, open_answers = [], []
    for reference, answer, kind, allowed in zip(references, answers, kinds, options, strict=True):
        if allowed:
            truth = choose(reference, allowed)
            closed_right[kind].append(truth is not None and choose(answer, allowed) == truth)
        else:
            open_refs.append(reference)
            open_answers.append(answer)
    result: dict[str, Any] = {}
    every = [r for rights in closed_right.values() for r in rights]
    if every:
        result["closed"] = {
            "n": len(every),
            "accuracy": sum(every) / len(every),
            "per_kind": {
                k: {"n": len(v), "accuracy": sum(v) / len(v)} for k, v in sorted(closed_right.items())
            },
        }
    if open_refs:
        result["open"] = {"n": len(open_refs), **text_metrics(open_refs, open_answers)}
    return result


def majority_answers(train: dict[str, list[Any]], questions: Sequence[str]) -> list[str]:
    """For each question, the most frequent training answer to it (overall most frequent if unseen)."""
    by_question: dict[str, Counter[str]] = defaultdict(Counter)
    for question, answer in zip(train["question"], train["reference"], strict=True):
        by_question[question][answer] += 1
    overall = Counter(train["reference"]).most_common(1)[0][0]
    return [by_question[q].most_common(1)[0][0] if q in by_question else overall for q in questions]


def retrieved_answers(train: dict[str, list[Any]], test: dict[str, list[Any]]) -> list[str]:
    """For each test row, the answer of the most similar training image to the same question."""
    keys = torch.cat(train["embedding"])
    query = torch.cat(test["embedding"])
    similarity = query.float() @ keys.float().T
    questions = train["question"]
    answers = []
    for row, question in enumerate(test["question"]):
        same = torch.tensor([q == question for q in questions])
        scores = similarity[row].masked_fill(~same, float("-inf")) if same.any() else similarity[row]
        answers.append(train["reference"][int(scores.argmax())])
    return answers


def evaluate_instruct(
    model: Any,
    rows: Manifest,
    config: RunConfig,
    image_keys: list[str],
    split: str,
    *,
    baselines: bool = True,
    write: bool = True,
) -> dict[str, Any]:
    """Scores of the model's first answers on ``split``, with the majority and retrieval baselines."""
    test = split_answers(model, rows, config, image_keys, split, generate=True)
    if not test["case_id"]:
        raise ValueError(f"split {split!r} has no conversation to evaluate on")
    refs, kinds, options = test["reference"], test["kind"], test["options"]
    results: dict[str, Any] = {"split": split, "n_rows": len(refs)}
    results.update(score_answers(refs, test["generated"], kinds, options))
    retrieved = None
    if baselines:
        train = split_answers(model, rows, config, image_keys, "train", generate=False)
        results["majority"] = score_answers(refs, majority_answers(train, test["question"]), kinds, options)
        if config.instruct.retrieval_baseline:
            retrieved = retrieved_answers(train, test)
            results["retrieval"] = score_answers(refs, retrieved, kinds, options)
    if write:
        path = Path(config.out) / ANSWERS_FILE
        with path.open("w", encoding="utf-8", newline="\n") as handle:
            for i, case_id in enumerate(test["case_id"]):
                row = {
                    "case_id": case_id,
                    "kind": kinds[i],
                    "reference": refs[i],
                    "generated": test["generated"][i],
                }
                row["retrieved"] = retrieved[i] if retrieved is not None else None
                handle.write(json.dumps(row) + "\n")
    return results
