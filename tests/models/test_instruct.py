"""The instruction-tuned model: image-token splicing, answer-only labels, freezing, bundles, chat."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medalign.models import create_model
from medalign.models.instruct import IGNORE, IMAGE_TOKEN, InstructModel

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"lm": {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
                "num_key_value_heads": 2}, "image_size": 32, "in_channels": 1}  # fmt: skip


@pytest.fixture(scope="module")
def model() -> InstructModel:
    torch.manual_seed(0)
    return create_model("instruct_tiny", **SMALL).eval()


def conversation(question: str, answer: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def test_labels_cover_only_the_answers_and_their_end(model: InstructModel) -> None:
    turns = [*conversation(f"{IMAGE_TOKEN}\nhow many lesions?", "two"), *conversation("which side?", "left")]
    ids, labels = model.encode_conversation(turns)
    tok = model.tokenizer
    answered = [i for i, label in zip(ids, labels, strict=True) if label != IGNORE]
    assert answered == [*tok("two", add_special_tokens=False)["input_ids"], model.eos_id,
                        *tok("left", add_special_tokens=False)["input_ids"], model.eos_id]  # fmt: skip
    assert ids.count(model.image_token_id) == 1
    assert all(label == IGNORE for i, label in zip(ids, labels, strict=True) if i == model.image_token_id)


def test_splice_puts_each_image_at_its_placeholder(model: InstructModel) -> None:
    one, _ = model.encode_conversation(conversation(f"{IMAGE_TOKEN} a", "b"))
    two, two_labels = model.encode_conversation(conversation(f"{IMAGE_TOKEN} and {IMAGE_TOKEN}", "c"))
    width = max(len(one), len(two))
    input_ids = torch.full((2, width), model.pad_id)
    mask = torch.zeros(2, width, dtype=torch.long)
    labels = torch.full((2, width), IGNORE)
    input_ids[0, : len(one)], mask[0, : len(one)] = torch.tensor(one), 1
    input_ids[1, : len(two)], mask[1, : len(two)] = torch.tensor(two), 1
    labels[1, : len(two)] = torch.tensor(two_labels)
    images = torch.stack([torch.full((3, 32), float(k)) for k in range(3)])  # 3 images, 3 tokens of width 32
    embeds, new_mask, new_labels = model.splice(input_ids, mask, images, labels)
    assert embeds.shape == (2, len(two) - 2 + 6, 32)
    assert int(new_mask[0].sum()) == len(one) - 1 + 3 and int(new_mask[1].sum()) == len(two) - 2 + 6
    first = one.index(model.image_token_id)
    assert torch.equal(embeds[0, first : first + 3], images[0])
    a, b = (i for i, t in enumerate(two) if t == model.image_token_id)
    assert torch.equal(embeds[1, a : a + 3], images[1])
    assert torch.equal(embeds[1, b + 2 : b + 5], images[2])  # shifted by the first image's 3 - 1 tokens
    assert (new_labels[1, a : a + 3] == IGNORE).all() and (new_labels[1, b + 2 : b + 5] == IGNORE).all()
    assert (new_labels != IGNORE).sum() == (torch.tensor(two_labels) != IGNORE).sum()  # answers kept
    with pytest.raises(ValueError, match="placeholders"):
        model.splice(input_ids, mask, images[:2], labels)
    with pytest.raises(ValueError, match="4 images for 3"):
        model.splice(input_ids, mask, torch.cat([images, images[:1]]), labels)


def test_loss_ignores_everything_but_answers(model: InstructModel) -> None:
    """Changing a question token changes the answer's logits but not which tokens are scored;
    changing an answer's label changes the loss."""
    ids, labels = model.encode_conversation(conversation(f"{IMAGE_TOKEN} how many?", "two"))
    pixels = torch.rand(1, 1, 32, 32)
    batch = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
    base = model(**batch, pixel_values=pixels, labels=torch.tensor([labels]))["loss"]
    embeds, mask, spliced = model.splice(batch["input_ids"], batch["attention_mask"],
                                         model.image_embeddings(pixels), torch.tensor([labels]))  # fmt: skip
    logits = model.lm(inputs_embeds=embeds, attention_mask=mask).logits[0, :-1]
    full = torch.nn.functional.cross_entropy(logits, spliced[0, 1:], ignore_index=IGNORE)
    assert torch.allclose(base, full, atol=1e-5)  # logits only at answer positions: the same loss
    no_answer = torch.full((1, len(ids)), IGNORE)
    assert model(**batch, pixel_values=pixels, labels=no_answer)["loss"] == 0
    other = [IGNORE if label == IGNORE else (label + 1) % 1000 for label in labels]
    assert model(**batch, pixel_values=pixels, labels=torch.tensor([other]))["loss"] != base


def test_projector_only_freezes_the_rest_and_only_the_projector_moves() -> None:
    torch.manual_seed(0)
    model = create_model("instruct_tiny", **SMALL)
    model.set_trainable(projector=True, lm=False, vision=False)
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"projector"}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids, labels = model.encode_conversation(conversation(f"{IMAGE_TOKEN} how many?", "two"))
    model.train()
    out = model(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), torch.rand(1, 1, 32, 32),
                torch.tensor([labels]))  # fmt: skip
    out["loss"].backward()
    optimizer.step()
    moved = {n.split(".")[0] for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {"projector"}
    assert not model.vision.training  # a frozen tower stays in eval mode


def test_lora_trains_adapters_only_and_merges_for_the_bundle(tmp_path: Path) -> None:
    from medalign.bundle import load_bundle, save_bundle

    torch.manual_seed(0)
    model = create_model("instruct_tiny", **SMALL)
    model.apply_lora(r=2, alpha=4, dropout=0.0, target_modules=["q_proj", "v_proj"])
    model.set_trainable(projector=True, lm=True)
    lm_trainable = [n for n, p in model.lm.named_parameters() if p.requires_grad]
    assert lm_trainable and all("lora_" in n for n in lm_trainable)
    with pytest.raises(ValueError, match="merge_lora"):
        model.portable_config()
    model.merge_lora()
    model.eval()
    save_bundle(model, tmp_path / "bundle")
    loaded = load_bundle(tmp_path / "bundle")
    pixels = torch.rand(1, 1, 32, 32)
    turns = [{"from": "human", "value": f"{IMAGE_TOKEN} how many?"}]
    assert loaded.generate([turns], pixels, max_new_tokens=4) == model.generate(
        [turns], pixels, max_new_tokens=4
    )


def test_chat_streams_what_it_returns_and_cache_does_not_change_greedy(model: InstructModel) -> None:
    pieces: list[str] = []
    image = torch.rand(1, 1, 32, 32)
    answer = model.chat(image, "how many lesions?", on_text=pieces.append, max_new_tokens=6)
    assert "".join(pieces).strip() == answer
    no_cache = model.chat(image, "how many lesions?", max_new_tokens=6, use_cache=False)
    assert no_cache == answer


def test_batched_generation_equals_one_by_one(model: InstructModel) -> None:
    """Left padding of spliced prompts: a short and a long prompt answer as they do alone."""
    turns = [[{"from": "human", "value": f"{IMAGE_TOKEN} hi"}],
             [{"from": "human", "value": f"{IMAGE_TOKEN} a much longer question about the lesions"}]]  # fmt: skip
    images = torch.rand(2, 1, 32, 32)
    together = model.generate(turns, images, max_new_tokens=5)
    alone = [model.generate([t], images[i : i + 1], max_new_tokens=5)[0] for i, t in enumerate(turns)]
    assert together == alone


def test_config_errors_are_clear() -> None:
    from medalign.models.instruct import InstructModelConfig

    with pytest.raises(ValueError, match="projector must be one of"):
        create_model("instruct_tiny", projector="conv")
    with pytest.raises(ValueError, match="model_type"):
        InstructModelConfig(vision={"kind": "clip_vision"}, text={"kind": "auto_text"}, lm={})
    assert create_model("instruct_tiny", **SMALL).config.lm["model_type"] == "llama"  # lm overrides merge


def test_no_repeat_ngram_guard_keeps_every_answer_token_distinct(model: InstructModel) -> None:
    """The captions' loop guard reaches the LM: with n = 1 no token comes twice (a random LM repeats)."""
    image = torch.rand(1, 1, 32, 32)
    ids = model.tokenizer(model.chat(image, "describe", max_new_tokens=24, no_repeat_ngram_size=1),
                          add_special_tokens=False)["input_ids"]  # fmt: skip
    assert len(ids) == len(set(ids))
    looping = model.tokenizer(model.chat(image, "describe", max_new_tokens=24), add_special_tokens=False)
    assert len(looping["input_ids"]) > len(set(looping["input_ids"]))


def test_uncached_decoding_is_greedy_only(model: InstructModel) -> None:
    """transformers re-enables its cache from inputs_embeds, so the uncached path is the model's own."""
    with pytest.raises(ValueError, match="greedily only"):
        model.chat(torch.rand(1, 1, 32, 32), "describe", max_new_tokens=4, use_cache=False, do_sample=True)
