"""Reports and questions written from structured findings, and the parser that reads reports back.

Why: the benchmark scores what a model says finding by finding, so every report the writer
produces must parse back to exactly the findings it was written from (organ, side, kind, size,
level), whatever wording, order and synonyms were drawn. The parser reads free text sentence by
sentence: a clause yields a finding when it names a lesion kind that no "no"/"without" before it
negates; the organ may come from an earlier clause of the same sentence ("Liver: a 12 mm cyst in
the upper third; a 6 mm calcification in the lower third.").

Questions follow M3D-VQA: ``Question Type`` 1 Plane, 2 Phase, 3 Organ, 4 Abnormality, 5 Location.
Here: 2 = contrast phase; 3 = which organ holds a lesion; 4 = what lesion an organ shows (or none),
its size class, and how many lesions the study has; 5 = where a lesion is (third and organ side).
Plane is always axial here, so no type-1 questions are asked. Every row has four choices and a
unique answer, so it serves closed-ended (choices) and open-ended (answer text) use alike.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from model_core.benchmark.anatomy import PHASES
from model_core.benchmark.findings import KINDS, LEVELS, ORGAN_KINDS, SIDED_ORGANS, Finding
from model_core.prompts import CHOICE_LETTERS

SITES: tuple[tuple[str, str | None], ...] = (
    ("liver", None),
    ("spleen", None),
    ("kidney", "right"),
    ("kidney", "left"),
    ("lung", "right"),
    ("lung", "left"),
)
_ADJECTIVE = {"liver": "hepatic", "spleen": "splenic", "kidney": "renal", "lung": "pulmonary"}
_KIND_WORDS: dict[str, tuple[str, ...]] = {
    "cyst": ("cyst", "simple cyst", "cystic lesion", "fluid-attenuation lesion"),
    "solid mass": ("solid mass", "soft-tissue mass", "solid lesion", "mass"),
    "calcification": ("calcification", "calcified focus", "calcified granuloma", "coarse calcification"),
    "lung nodule": ("nodule", "solid nodule", "non-calcified nodule", "soft-tissue nodule"),
}
# Level phrases without the organ ("the upper pole"), per organ.
_LEVEL_WORDS: dict[str, dict[str, tuple[str, ...]]] = {
    "liver": {
        "upper": ("upper third", "superior portion", "dome"),
        "middle": ("middle third", "mid portion"),
        "lower": ("lower third", "inferior portion"),
    },
    "spleen": {
        "upper": ("upper pole", "superior portion"),
        "middle": ("middle third", "mid portion"),
        "lower": ("lower pole", "inferior portion"),
    },
    "kidney": {
        "upper": ("upper pole", "upper third"),
        "middle": ("interpolar region", "mid portion", "middle third"),
        "lower": ("lower pole", "lower third"),
    },
    "lung": {
        "upper": ("upper third", "superior portion"),
        "middle": ("middle third", "mid portion"),
        "lower": ("lower third", "base"),
    },
}
_NORMAL_ORGAN: dict[str, tuple[str, ...]] = {
    "liver": (
        "No focal hepatic lesion.",
        "The liver is unremarkable.",
        "The liver is normal in size and attenuation, without focal lesion.",
        "Liver: no focal lesion.",
    ),
    "spleen": (
        "The spleen is unremarkable.",
        "No splenic lesion.",
        "Spleen: normal.",
        "The spleen is normal in size without focal lesion.",
    ),
    "kidneys": (
        "Both kidneys are unremarkable.",
        "No renal mass or cyst.",
        "The kidneys are normal without focal lesion.",
        "Kidneys: no focal lesion.",
    ),
    "kidney": (
        "The {side} kidney is unremarkable.",
        "No focal lesion in the {side} kidney.",
        "{Side} kidney: normal.",
    ),
    "lungs": (
        "The imaged lungs are clear.",
        "No pulmonary nodule.",
        "Lungs: clear.",
        "No focal lung lesion.",
    ),
    "lung": ("The {side} lung is clear.", "No nodule in the {side} lung.", "{Side} lung: clear."),
}
_ALL_NORMAL = (
    "No focal lesion in the {sites}.",
    "No focal lesion is identified.",
    "Unremarkable study without focal lesion.",
)
_FILLER = (
    "The aorta is normal in caliber.",
    "No lymphadenopathy.",
    "The osseous structures are unremarkable.",
    "No free fluid.",
)

# Parsing: patterns over lower-cased text.
_ORGAN_PATTERN = re.compile(r"\b(liver|hepatic|spleen|splenic|kidneys?|renal|lungs?|pulmonary)\b")
# "left lower lobe" names a lung only when no organ word is present ("right lobe of the liver").
_LOBE_PATTERN = re.compile(r"\b(lobe)\b")
_ORGAN_OF_WORD = {
    "lobe": "lung",
    "liver": "liver",
    "hepatic": "liver",
    "spleen": "spleen",
    "splenic": "spleen",
    "kidney": "kidney",
    "kidneys": "kidney",
    "renal": "kidney",
    "lung": "lung",
    "lungs": "lung",
    "pulmonary": "lung",
}
_SIDE_PATTERN = re.compile(r"\b(right|left)\b")
_NEGATION = re.compile(r"\b(no|without|negative for|free of|resolved)\b")
_CALCIFIED = re.compile(r"(?<!non-)(?<!non)\b(calcif\w*|granuloma\w*|calculus|calculi)")
_CYST = re.compile(r"\b(cyst\w*|fluid[- ]attenuation|fluid[- ]density)")
_MASS = re.compile(r"\b(mass|masses|solid|soft[- ]tissue|tumou?r|neoplasm)\b")
_NODULE = re.compile(r"\b(nodules?|nodular|opacity|mass|lesion)\b")
_LEVEL_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("upper", re.compile(r"\b(upper|superior|dome|cranial|apical)\b")),
    ("middle", re.compile(r"\b(middle|mid|interpolar|central)\b")),
    ("lower", re.compile(r"\b(lower|inferior|base|basal|caudal)\b")),
)
_SIZE_PAIR = re.compile(r"(\d+(?:\.\d+)?)\s*(?:x|×|by)\s*(\d+(?:\.\d+)?)\s*(mm|cm)\b")
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*-?\s*(mm|cm|millimet(?:er|re)s?|centimet(?:er|re)s?)\b")
_SENTENCE_SPLIT = re.compile(r"(?<!\d)\.(?!\d)|\n")


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _site_text(organ: str, side: str | None) -> str:
    return f"{side} {organ}" if side else organ


def _size_text(size_mm: float, rng: np.random.Generator) -> str:
    """``"14 mm"`` or ``"1.4 cm"``; whole millimetres, so both parse back exactly."""
    if rng.random() < 0.6:
        return f"{size_mm:g} mm"
    return f"{size_mm / 10:g} cm"


def _article(following: str) -> str:
    """``"an"`` before words read with a vowel sound: "an 8 mm", "an 11 mm", "an 18 mm"."""
    spoken_vowel = re.match(r"(8|11|18)(?![\d.])|8\d(?![\d.])|[aeiou]", following)
    return "an" if spoken_vowel else "a"


def _finding_sentence(finding: Finding, rng: np.random.Generator) -> str:
    """One sentence stating one finding, in one of several wordings."""
    if finding.size_mm is None or finding.level is None:
        raise ValueError(f"finding {finding.site} {finding.kind} needs size_mm and level to be written")
    size = _size_text(finding.size_mm, rng)
    kind = _pick(rng, _KIND_WORDS[finding.kind])
    level = _pick(rng, _LEVEL_WORDS[finding.organ][finding.level])
    organ = f"the {finding.site}"
    adjective = f"{finding.side} {_ADJECTIVE[finding.organ]}" if finding.side else _ADJECTIVE[finding.organ]
    templates = (
        f"There is {_article(size)} {size} {kind} in the {level} of {organ}.",
        f"{_article(size)} {size} {kind} is seen in the {level} of {organ}.",
        f"The {level} of {organ} contains {_article(kind)} {kind} measuring {size}.",
        f"{kind} in the {level} of {organ}, measuring {size}.",
        f"{adjective} {kind} ({size}) in the {level}.",
        f"Noted is {_article(size)} {size} {adjective} {kind} in the {level}.",
    )
    sentence = _pick(rng, templates)
    return sentence[0].upper() + sentence[1:]


def _normal_sentence(group: str, side: str | None, rng: np.random.Generator) -> str:
    text = _pick(rng, _NORMAL_ORGAN[group])
    return text.format(side=side or "", Side=(side or "").capitalize())


def _join_sites(sites: Sequence[str]) -> str:
    return sites[0] if len(sites) == 1 else ", ".join(sites[:-1]) + " or " + sites[-1]


def write_report(
    findings: Sequence[Finding],
    rng: np.random.Generator,
    sites_in_view: Sequence[tuple[str, str | None]] = SITES,
) -> str:
    """A findings paragraph stating every finding once, and the other organs in view as normal.

    Wording, synonyms, organ order and layout (prose or "Organ: ..." lines) vary with ``rng``;
    ``parse_report`` recovers organ, side, kind, size and level of every finding exactly.
    """
    for finding in findings:
        if (finding.organ, finding.side) not in sites_in_view:
            raise ValueError(
                f"finding in the {finding.site} but sites_in_view={list(sites_in_view)}; add the site"
            )
    order = list(sites_in_view)
    if rng.random() < 0.5:
        order = [order[i] for i in rng.permutation(len(order))]
    if not findings and rng.random() < 0.3:
        names = [_site_text(o, s) for o, s in order]
        sentences = [_pick(rng, _ALL_NORMAL).format(sites=_join_sites(names))]
    else:
        sentences = _organ_sentences(findings, order, rng)
    for index in rng.permutation(len(_FILLER))[: int(rng.integers(0, 3))]:
        sentences.insert(int(rng.integers(len(sentences) + 1)), _FILLER[index])
    separator = "\n" if rng.random() < 0.25 else " "
    return separator.join(sentences)


def _organ_sentences(
    findings: Sequence[Finding], order: Sequence[tuple[str, str | None]], rng: np.random.Generator
) -> list[str]:
    """Sentences per site in ``order``: its findings (shuffled), else a normal statement.

    Two normal sides of a paired organ may be stated together ("Both kidneys are unremarkable.").
    """
    sentences: list[str] = []
    done: set[tuple[str, str | None]] = set()
    for organ, side in order:
        if (organ, side) in done:
            continue
        own = [f for f in findings if (f.organ, f.side) == (organ, side)]
        other_side = (organ, "left" if side == "right" else "right")
        if own:
            sentences.extend(_finding_sentence(own[i], rng) for i in rng.permutation(len(own)))
            if rng.random() < 0.3:
                sentences.append(f"The {_site_text(organ, side)} is otherwise unremarkable.")
        elif (
            organ in SIDED_ORGANS
            and other_side in order
            and other_side not in done
            and not any((f.organ, f.side) == other_side for f in findings)
            and rng.random() < 0.7
        ):
            sentences.append(_normal_sentence(organ + "s", None, rng))
            done.add(other_side)
        else:
            sentences.append(_normal_sentence(organ, side, rng))
        done.add((organ, side))
    return sentences


def _kind_of(clause: str, organ: str) -> str | None:
    """The lesion kind a clause names, read with the organ's vocabulary; None if it names none."""
    if _CALCIFIED.search(clause):
        return "calcification"
    if organ == "lung":
        return "lung nodule" if _NODULE.search(clause) or _CYST.search(clause) else None
    if _CYST.search(clause):
        return "cyst"
    if _MASS.search(clause) or re.search(r"\bnodules?\b", clause):
        return "solid mass"
    return None


def _first_kind_position(clause: str) -> int | None:
    positions = [m.start() for p in (_CALCIFIED, _CYST, _MASS, _NODULE) if (m := p.search(clause))]
    return min(positions) if positions else None


def _size_of(clause: str) -> float | None:
    """Longest diameter in mm: ``"14 x 11 mm"`` -> 14, ``"1.4 cm"`` -> 14."""
    pair = _SIZE_PAIR.search(clause)
    if pair:
        value, unit = max(float(pair.group(1)), float(pair.group(2))), pair.group(3)
    else:
        single = _SIZE.search(clause)
        if not single:
            return None
        value, unit = float(single.group(1)), single.group(2)
    size = value * 10.0 if unit.startswith("c") else value
    return round(size, 1) if size > 0 else None


def _level_of(clause: str) -> str | None:
    found = [level for level, pattern in _LEVEL_PATTERNS if pattern.search(clause)]
    return found[0] if len(found) == 1 else None


def organs_named(text: str) -> set[str]:
    """The organs (``findings.ORGANS``) a report speaks of at all, normal or not: what a reader
    checks against the field of view ("Both kidneys are unremarkable." names the kidneys)."""
    return {_ORGAN_OF_WORD[word] for word in _ORGAN_PATTERN.findall(text.lower())}


def parse_report(text: str) -> list[Finding]:
    """The findings a report states: organ, side, kind, size (mm) and level of each lesion.

    Negated mentions ("No renal mass or cyst.") and sentences without a lesion kind are skipped;
    a missing size, level or side is returned as None (such findings then fail to match on
    scoring rather than vanish).
    """
    findings: list[Finding] = []
    for sentence in _SENTENCE_SPLIT.split(text.lower()):
        organ: str | None = None
        side: str | None = None
        for clause in sentence.split(";"):
            organ_match = _ORGAN_PATTERN.search(clause) or _LOBE_PATTERN.search(clause)
            if organ_match:
                organ = _ORGAN_OF_WORD[organ_match.group(1)]
                before = _SIDE_PATTERN.findall(clause[: organ_match.start()])
                anywhere = _SIDE_PATTERN.findall(clause)
                side = before[-1] if before else (anywhere[0] if anywhere else None)
            if organ is None:
                continue
            start = _first_kind_position(clause)
            kind = _kind_of(clause, organ)
            if kind is None or start is None or _NEGATION.search(clause[:start]):
                continue
            findings.append(
                Finding(
                    organ=organ,
                    kind=kind,
                    size_mm=_size_of(clause),
                    side=side if organ in SIDED_ORGANS else None,
                    level=_level_of(clause),
                )
            )
    return findings


# ---- questions (M3D-VQA layout) ----

SIZE_CHOICES: tuple[str, ...] = ("smaller than 10 mm", "10 to 20 mm", "21 to 30 mm", "larger than 30 mm")
COUNT_CHOICES: tuple[str, ...] = ("0", "1", "2", "3")
NO_LESION = "no focal lesion"
_DISTRACTOR_PHASE = "delayed"


def size_choice(size_mm: float) -> str:
    """The size class a question offers; a finer split of the finding buckets (large = last two)."""
    if size_mm < 10:
        return SIZE_CHOICES[0]
    if size_mm <= 20:
        return SIZE_CHOICES[1]
    return SIZE_CHOICES[2] if size_mm <= 30 else SIZE_CHOICES[3]


def _row(
    question_type: int,
    question: str,
    answer: str,
    choices: Sequence[str],
    rng: np.random.Generator,
    shuffle: bool = True,
) -> dict[str, str | int]:
    """One M3D-VQA row (without image and text columns): four choices, the answer among them."""
    if len(choices) != 4 or answer not in choices or len(set(choices)) != 4:
        raise ValueError(
            f"question {question!r}: needs four distinct choices including {answer!r}, got {list(choices)}"
        )
    ordered = [choices[i] for i in rng.permutation(4)] if shuffle else list(choices)
    row: dict[str, str | int] = {"Question Type": question_type, "Question": question}
    row.update({f"Choice {letter}": choice for letter, choice in zip(CHOICE_LETTERS, ordered, strict=True)})
    row["Answer"] = answer
    row["Answer Choice"] = CHOICE_LETTERS[ordered.index(answer)]
    return row


def _location_text(finding: Finding) -> str:
    return f"{finding.level} third of the {finding.site}"


def _with_distractors(answer: str, pool: Sequence[str], rng: np.random.Generator) -> list[str]:
    """The answer and three other options drawn from ``pool``."""
    others = [option for option in dict.fromkeys(pool) if option != answer]
    return [answer, *(others[i] for i in rng.permutation(len(others))[:3])]


def _abnormality_choices(organ: str, answer: str) -> list[str]:
    """The organ's own kinds and "no focal lesion" first, padded to four with other kinds."""
    options = [*ORGAN_KINDS[organ], NO_LESION]
    options += [kind for kind in KINDS if kind not in options]
    if answer not in options[:4]:
        raise ValueError(f"answer {answer!r} is not a choice for the {organ}")
    return options[:4]


def _unique_names(findings: Sequence[Finding], reveal_site: bool) -> dict[int, str]:
    """A phrase naming each finding that no other finding of the study shares.

    With ``reveal_site`` False (organ and location questions) the phrase may give the size but
    not the organ: "the cyst", "the 14 mm cyst". With it True (size questions) it may give the
    organ and level but not the size: "the cyst in the liver", "the cyst in the upper third of
    the liver". Findings no phrase singles out get no question.
    """
    if reveal_site:
        describers = (
            lambda f: f"the {f.kind}",
            lambda f: f"the {f.kind} in the {f.site}",
            lambda f: f"the {f.kind} in the {_location_text(f)}",
        )
    else:
        describers = (lambda f: f"the {f.kind}", lambda f: f"the {f.size_mm:g} mm {f.kind}")
    names = {}
    for index, finding in enumerate(findings):
        for describe in describers:
            name = describe(finding)
            if sum(describe(other) == name for other in findings) == 1:
                names[index] = name
                break
    return names


def make_questions(
    findings: Sequence[Finding],
    rng: np.random.Generator,
    sites_in_view: Sequence[tuple[str, str | None]] = SITES,
    phase: str | None = None,
    max_questions: int = 6,
) -> list[dict[str, str | int]]:
    """Up to ``max_questions`` M3D-VQA rows about one study (types as in the module docstring).

    Each row: ``Question Type``, ``Question``, ``Choice A``-``D``, ``Answer``, ``Answer Choice``.
    Normal studies get count, "what abnormality" (answer: no focal lesion) and phase questions.
    """
    rows = [
        _row(
            4,
            "How many focal lesions are seen in this CT?",
            str(len(findings)),
            COUNT_CHOICES,
            rng,
            shuffle=False,
        )
    ]
    if phase is not None:
        rows.append(
            _row(2, "In which contrast phase was this CT acquired?", phase, [*PHASES, _DISTRACTOR_PHASE], rng)
        )
    for organ, side in sites_in_view:
        own = {f.kind for f in findings if (f.organ, f.side) == (organ, side)}
        if len(own) <= 1:
            answer = own.pop() if own else NO_LESION
            question = f"What abnormality is seen in the {_site_text(organ, side)}?"
            rows.append(_row(4, question, answer, _abnormality_choices(organ, answer), rng))
    all_sites = [_site_text(o, s) for o, s in SITES]
    for index, name in _unique_names(findings, reveal_site=False).items():
        finding = findings[index]
        rows.append(
            _row(
                3,
                f"Which organ contains {name}?",
                finding.site,
                _with_distractors(finding.site, all_sites, rng),
                rng,
            )
        )
        location = _location_text(finding)
        nearby = [f"{level} third of the {finding.site}" for level in LEVELS]
        nearby += [f"{finding.level} third of the {site}" for site in all_sites]
        rows.append(
            _row(5, f"Where is {name} located?", location, _with_distractors(location, nearby, rng), rng)
        )
    for index, name in _unique_names(findings, reveal_site=True).items():
        answer = size_choice(findings[index].size_mm)
        rows.append(_row(4, f"What is the size of {name}?", answer, SIZE_CHOICES, rng, shuffle=False))
    chosen = sorted(rng.permutation(len(rows))[:max_questions])
    return [rows[i] for i in chosen]
