"""The released code's heuristic reward terms: self-critique, image revisit, repetition.

Source: ``examples/reward_function/math.py`` and ``text.py`` of the released ReVisual-R1 code, in
two versions: an older ``math.py`` (keyword self-critique, five circular patterns) and the
current ``math.py`` / ``text.py`` (weighted self-critique, six circular patterns). Phrase lists,
weights and caps are those files'; the code is this project's. All terms are in [0, 1].

self_critique_reward (older math.py)
    min(1, 0.05 * sum_k w_k * #matches(\\b k \\b, case-insensitive)). The released keyword list
    names some words twice ("but", "wait", "perhaps", "mistake", "rethink", "reassess",
    "revisit", "recheck"), so they count double: w_k is that multiplicity.
weighted_self_critique_reward (current math.py and text.py)
    0 for a text under 10 characters (stripped). Otherwise, on the text with whitespace runs
    made single spaces and "..." made ".", split into sentences after [.!?] before [A-Z0-9]:
      keywords  sum_p w_p * (1 + 0.5 * (c_p - 1)) over the 42 weighted patterns with c_p >= 1
                matches (``_WEIGHTED_CRITIQUE``);
      sequences 0.25 per sentence of >= 5 characters that opens a reflection (``_STARTERS``)
                and is followed within the next 3 sentences by a correction (``_FOLLOWUPS``),
                at most 3;
      structure 0.1 if, with >= 4 sentences, the second half (from n // 2) holds more
                (sentence, pattern) hits than the first;
    clipped to [0, 1].
image_revisit_reward  = min(1, min(0.4, 0.2 * #initial references)
                             + min(0.3, 0.3 * #revisit phrases)
                             + min(0.3, 0.3 * #(revisit sentence followed by a correction sentence)))
repetition_reward     = max(0, 1 - min(0.5, 0.1 * duplicate sentences)
                                 - min(0.3, 0.05 * repeated word 5-grams)
                                 - min(0.2, 0.1 * circular patterns + 0.2 * "maybe X. But wait ... maybe X"))
    ``wait_maybe_loops=True`` adds the sixth circular pattern ("Wait, maybe ... Wait, maybe") of
    the released ``text.py`` variant.

Three released patterns use a back-reference and backtrack cubically on long lines:
``(.*?)\\s+But\\s+(?:wait|...).*?\\1`` and its "So maybe" sibling took 9 s in ``re`` on one
16k-character line, "maybe X. But wait ... maybe X" over 10 s on another. They are counted here
by exact emulations of the regex engine's leftmost-first semantics (``_count_backref_circles``,
``_count_maybe_but_wait``) that only visit the anchor words and test recurrence with bounded
``str.find``/``startswith``; each docstring gives the argument, and tests compare the counts
with ``re.findall`` on random texts. Text whose lower-casing changes length (e.g. "İ") goes to
``re`` itself.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from collections import Counter
from collections.abc import Iterator

__all__ = [
    "image_revisit_reward",
    "repetition_reward",
    "self_critique_reward",
    "weighted_self_critique_reward",
]

_I = re.IGNORECASE

# Matching is case-insensitive. Instead of re.IGNORECASE (several times slower on long text),
# the text is folded once and matched case-sensitively by all-lowercase patterns. For ASCII
# patterns that is exactly IGNORECASE: besides A-Z, the only characters re folds onto ASCII
# letters are these four (found by testing every code point against [a-z] under re.I).
_FOLD = str.maketrans(
    {**{chr(c): chr(c + 32) for c in range(ord("A"), ord("Z") + 1)},
     "\u0130": "i", "\u0131": "i", "\u017f": "s", "\u212a": "k"}
)  # fmt: skip


def _fold(text: str) -> str:
    return text.translate(_FOLD)


# --- self-critique ---------------------------------------------------------------------------
_CRITIQUE_KEYWORDS: dict[str, int] = {
    "but": 2, "wait": 2, "maybe": 1, "mistake": 2, "however": 1, "perhaps": 2, "let me check": 1,
    "revise": 1, "second thought": 1, "that seems contradictory": 1, "alternatively": 1,
    "on the other hand": 1, "i think": 1, "i guess": 1, "i suppose": 1, "i wonder": 1,
    "i believe": 1, "i feel": 1, "i mean": 1, "i assume": 1, "i expect": 1, "i hope": 1,
    "i doubt": 1, "i question": 1, "i reflect": 1, "i reconsider": 1, "i re-evaluate": 1,
    "rethink": 2, "reassess": 2, "revisit": 2, "recheck": 2, "reconsider": 1, "re-evaluate": 1,
    "self-reflective": 1, "self-reflection": 1, "self-critique": 1, "self-criticism": 1,
    "self-analysis": 1,
}  # fmt: skip
# One pass instead of one per keyword: a zero-width match at every word boundary where a keyword
# starts, so overlapping hits ("i reconsider" and "reconsider") are both found. No keyword is a
# whole-word prefix of another, so at most one can start at a position.
_CRITIQUE_ANY = re.compile(r"\b(?=(" + "|".join(re.escape(k) for k in _CRITIQUE_KEYWORDS) + r")\b)")


def self_critique_reward(response: str) -> float:
    """Reward for self-reflective wording (released ``math.py``); see the module docstring."""
    count = sum(_CRITIQUE_KEYWORDS[k] for k in _CRITIQUE_ANY.findall(_fold(response)))
    return min(1.0, count * 0.05)


# The current release's weights per pattern; matched case-insensitively on the lower-cased text.
_WEIGHTED_CRITIQUE: dict[str, float] = {
    # strong self-critique
    "mistake": 0.12, "error": 0.12, "incorrect": 0.12, "wrong": 0.10, "i was mistaken": 0.15,
    "that's not right": 0.15, "this contradicts": 0.15, "i need to reconsider": 0.15,
    "this doesn't make sense": 0.14, "i made an error": 0.15, "contradiction": 0.13,
    "flaw": 0.12, "invalid": 0.12,
    # reconsideration
    "let me recalculate": 0.10, "let's revise": 0.10, "let me reconsider": 0.10,
    "let's rethink": 0.10, "let me check again": 0.09, "double-check": 0.09, "verify": 0.08,
    "re-evaluate": 0.10, "reassess": 0.10, "revisit": 0.08, "let's try again": 0.09,
    # doubt
    "wait": 0.06, "hold on": 0.06, "i doubt": 0.07, "i question": 0.07, "however": 0.05,
    "but": 0.04, "although": 0.04, "on second thought": 0.08, "wait a second": 0.07,
    "is that right": 0.08, "did i miss something": 0.08,
    # mild reflection
    "perhaps": 0.03, "maybe": 0.03, "i think": 0.02, "i wonder": 0.04, "alternatively": 0.05,
    "on the other hand": 0.05, "i'm not sure": 0.05,
}  # fmt: skip
_WEIGHTED_RES = [
    (re.compile(rf"\b{re.escape(k)}\b", _I), w) for k, w in _WEIGHTED_CRITIQUE.items()
]
_STARTERS = re.compile("|".join([
    r"(?:That|This|It|The result) (?:is|seems|appears to be) (?:incorrect|wrong|mistaken|an error|a mistake|flawed)",
    r"(?:I|We) (?:made|committed) (?:an error|a mistake|a miscalculation)",
    r"(?:I|We) (?:was|were) (?:wrong|mistaken|incorrect|in error)",
    (r"(?:Wait|Hold on|Actually|However|But|Oh)(?:,)? (?:that|this|it) (?:doesn't|does not) "
     r"(?:seem|look|appear) (?:right|correct|accurate)"),
    r"(?:Let|I should|I need to) (?:me|) (?:reconsider|recalculate|rethink|revise|check|verify|double-check)",
    r"(?:Let's|Let us) (?:try again|recalculate|rethink|revise|check|verify|double-check)",
    r"(?:Wait|Hold on|Hmm|Actually|But|However)(?:,)? (?:I'm|I am|I) (?:not sure|uncertain|confused|doubtful|unsure)",
    (r"(?:Wait|Hold on|Hmm|Actually|But|However)(?:,)? (?:this|that|it) (?:might|may|could) "
     r"(?:be|not be) (?:right|correct|accurate)"),
]), _I)  # fmt: skip
_FOLLOWUPS = re.compile("|".join([
    r"(?:The|A) correct (?:answer|solution|approach|calculation|value|result) (?:is|should be)",
    r"(?:I|We) should (?:have|instead) (?:calculated|computed|determined|found|used)",
    r"(?:Actually|In fact|Instead|Rather|Correctly)(?:,)? (?:the|we|I) (?:should|need to|must|have to)",
    (r"(?:After|Upon) (?:reconsideration|recalculation|checking|verifying)(?:,)? "
     r"(?:I|we) (?:see|realize|find|determine)"),
    (r"(?:Now|So|Therefore|Thus)(?:,)? (?:the|a) (?:correct|accurate|proper|right) "
     r"(?:approach|calculation|solution|answer)"),
    r"(?:The|A) (?:error|mistake|issue|problem|flaw) (?:was|is) (?:that|because|due to)",
    r"(?:I|We) (?:missed|overlooked|forgot|didn't consider|failed to account for)",
    r"(?:This|That) (?:leads to|gives|results in|produces) (?:a|the) (?:correct|accurate|better|improved|proper)",
]), _I)  # fmt: skip
_WHITESPACE_RUN = re.compile(r"\s+")
_DOTS = re.compile(r"\.{2,}")
_SENTENCE_START = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9])")


def weighted_self_critique_reward(response: str) -> float:
    """Self-reflection score of the current release (``math.py`` / ``text.py``); see the module
    docstring for the three parts."""
    if len(response.strip()) < 10:
        return 0.0
    text = _DOTS.sub(".", _WHITESPACE_RUN.sub(" ", response))
    lower = text.lower()
    keywords, present = 0.0, []
    for pattern, weight in _WEIGHTED_RES:
        count = len(pattern.findall(lower))
        if count:
            keywords += weight * (1 + 0.5 * (count - 1))
            present.append(pattern)
    sentences = _SENTENCE_START.split(text)
    sequences = 0
    for i, sentence in enumerate(sentences):
        if len(sentence) >= 5 and _STARTERS.search(sentence):
            if any(_FOLLOWUPS.search(s) for s in sentences[i + 1 : i + 4]):
                sequences += 1
                if sequences == 3:
                    break
    structure = 0.0
    if len(sentences) >= 4:
        # A pattern found in a sentence is found in the whole text too (none spans a sentence
        # break), so only the patterns present at all need a per-sentence search.
        hits = [sum(1 for p in present if p.search(s.lower())) for s in sentences]
        half = len(sentences) // 2
        structure = 0.1 if sum(hits[half:]) > sum(hits[:half]) else 0.0
    return min(1.0, max(0.0, keywords + 0.25 * sequences + structure))


# --- image revisit ---------------------------------------------------------------------------
# All lowercase: matched against folded text.
_INITIAL_REFERENCE = [
    r"the image shows", r"according to the image", r"the image illustrates", r"the image depicts",
    r"in the image", r"from the image", r"the diagram", r"the figure", r"as shown", r"is displayed",
]  # fmt: skip
_REVISIT = [
    r"looking (?:at|back at) the image again", r"upon (?:further|closer) inspection",
    r"revisiting the (?:image|figure|diagram)", r"taking another look",
    r"on second thought.{1,30}(?:image|figure|diagram)", r"wait.{1,30}(?:image|figure|diagram)",
    r"but.{1,30}(?:image|figure|diagram)", r"checking the (?:image|figure|diagram) again",
    r"let me look at the (?:image|figure|diagram) again", r"the (?:image|figure|diagram).{1,30}shows",
    r"no, the (?:image|figure|diagram)", r"if i look at the (?:image|figure|diagram) more carefully",
]  # fmt: skip
_CORRECTION = [
    r"i (?:see|notice|realize|observe) that", r"actually", r"in fact", r"i was (?:wrong|mistaken|incorrect)",
    r"contrary to", r"unlike what i thought", r"(?:now|then) i (?:can|see|understand)",
    r"this (?:contradicts|confirms)", r"(?:now|then) it (?:is clear|becomes clear)", r"i missed that",
    r"i didn't notice", r"i overlooked",
]  # fmt: skip
_INITIAL_RES = [re.compile(p) for p in _INITIAL_REFERENCE]
_REVISIT_RES = [re.compile(p) for p in _REVISIT]
# "Does any pattern occur in this sentence" is one search over the alternation.
_REVISIT_ANY = re.compile("|".join(f"(?:{p})" for p in _REVISIT))
_CORRECTION_ANY = re.compile("|".join(f"(?:{p})" for p in _CORRECTION))
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+")


def image_revisit_reward(response: str) -> float:
    """Reward for referring back to the image and correcting course (released ``math.py``)."""
    text = _fold(response)
    initial = sum(len(p.findall(text)) for p in _INITIAL_RES)
    revisits = sum(len(p.findall(text)) for p in _REVISIT_RES)
    sentences = _SENTENCE_SPLIT.split(text)
    sequences = sum(
        1
        for a, b in zip(sentences, sentences[1:], strict=False)
        if _REVISIT_ANY.search(a) and _CORRECTION_ANY.search(b)
    )
    total = min(0.2 * initial, 0.4) + min(0.3 * revisits, 0.3) + min(0.3 * sequences, 0.3)
    return min(total, 1.0)


# --- repetition ------------------------------------------------------------------------------
_BUT_CIRCLE = r"(.*?)\s+But\s+(?:wait|actually|maybe|perhaps).*?\1"
_SO_MAYBE_CIRCLE = r"(.*?)\s+So\s+maybe\s+(?:.*?)\s+But\s+(?:wait|actually).*?\1"
_PLAIN_CIRCLES = [
    re.compile(
        r"But the image (?:displays|illustrates|shows|depicts).*?But the image (?:displays|illustrates|shows|depicts)",
        _I,
    ),
    re.compile(r"So maybe.*?So maybe", _I),
    re.compile(r"Wait, but.*?Wait, but", _I),
]
_WAIT_MAYBE_CIRCLE = re.compile(r"Wait, maybe.*?Wait, maybe", _I)
_MAYBE_BUT_WAIT = re.compile(r"maybe\s+(.*?)\.\s+But\s+(?:wait|actually).*?maybe\s+\1", _I)
_BUT_ANCHOR_1 = re.compile(r"\s+but\s+(?:wait|actually|maybe|perhaps)", _I)
_BUT_ANCHOR_2 = re.compile(r"\s+but\s+(?:wait|actually)", _I)
_SO_MAYBE_ANCHOR = re.compile(r"\s+so\s+maybe", _I)
_MAYBE = re.compile(r"maybe", _I)
_DOT_BUT_ANCHOR = re.compile(r"\.\s+but\s+(?:wait|actually)", _I)
_WS_RUN = re.compile(r"\s*")


def repetition_reward(response: str, *, wait_maybe_loops: bool = False) -> float:
    """1 minus penalties for repeated sentences, 5-grams and circular reasoning (released
    ``math.py``; ``wait_maybe_loops=True`` gives the ``text.py`` variant)."""
    sentences = _SENTENCE_SPLIT.split(response)
    duplicate_sentences = sum(c - 1 for c in Counter(sentences).values() if c > 1)
    words = response.split()
    repeated_5grams = 0
    if len(words) >= 5:
        grams = Counter(zip(words, words[1:], words[2:], words[3:], words[4:], strict=False))
        repeated_5grams = sum(c - 1 for c in grams.values() if c > 1)
    circles = _count_backref_circles(response)
    circles += sum(len(p.findall(response)) for p in _PLAIN_CIRCLES)
    if wait_maybe_loops:
        circles += len(_WAIT_MAYBE_CIRCLE.findall(response))
    maybe_but_wait = _count_maybe_but_wait(response)
    penalty = (
        min(0.5, 0.1 * duplicate_sentences)
        + min(0.3, 0.05 * repeated_5grams)
        + min(0.2, 0.1 * circles + 0.2 * maybe_but_wait)
    )
    return max(0.0, 1.0 - penalty)


def _count_backref_circles(text: str) -> int:
    """``len(re.findall(P, text, re.I))`` summed over ``_BUT_CIRCLE`` and ``_SO_MAYBE_CIRCLE``."""
    low = _simple_lower(text)
    if low is None:
        return len(re.findall(_BUT_CIRCLE, text, _I)) + len(re.findall(_SO_MAYBE_CIRCLE, text, _I))
    but_wait_any = [
        (m.start(), m.start() + _lead(m), [m.end()]) for m in _BUT_ANCHOR_1.finditer(text)
    ]
    but_wait = [(m.start(), m.start() + _lead(m), m.end()) for m in _BUT_ANCHOR_2.finditer(text)]
    so_maybe = []
    for m in _SO_MAYBE_ANCHOR.finditer(text):
        maybe_end = m.end()
        run_end = _WS_RUN.match(text, maybe_end).end()  # type: ignore[union-attr]
        if run_end > maybe_end:  # "maybe" must be followed by whitespace
            reachable = _reachable_buts(text, maybe_end, run_end, but_wait)
            so_maybe.append((m.start(), m.start() + _lead(m), reachable))
    return _count_matches(text, low, but_wait_any) + _count_matches(text, low, so_maybe)


def _lead(m: re.Match[str]) -> int:
    """Length of the whitespace run an anchor match starts with."""
    s = m.group(0)
    return len(s) - len(s.lstrip())


def _simple_lower(text: str) -> str | None:
    """Per-character lowercase, as ``re`` compares back-references under IGNORECASE, or None if
    some character lower-cases to several (offsets would no longer line up)."""
    if text.isascii():
        return text.lower()
    chars = [c.lower() for c in text]
    if any(len(c) != 1 for c in chars):
        return None
    return "".join(chars)


def _reachable_buts(
    text: str, maybe_end: int, run_end: int, buts: list[tuple[int, int, int]]
) -> list[int]:
    """Keyword ends of the "But wait|actually" anchors that ``maybe\\s+(?:.*?)\\s+But`` can reach,
    in the order the backtracking engine tries them: greedy whitespace first (anchors after
    other text on the same line), then the anchor right after "maybe" when its run is >= 2."""
    newline = text.find("\n", run_end)
    limit = len(text) if newline < 0 else newline
    order = [k for w0, _, k in buts if run_end <= w0 <= limit]
    order += [
        k for w0, wb, k in buts if w0 == maybe_end and wb == run_end and run_end - maybe_end >= 2
    ]
    return order


def _count_matches(text: str, low: str, anchors: list[tuple[int, int, list[int]]]) -> int:
    """Count leftmost-first, non-overlapping matches of ``(.*?)\\s+<anchor>...(.*?)\\1``.

    Each anchor is ``(w0, wb, kw_ends)``: the group may end anywhere in the whitespace run
    ``[w0, wb)`` before the anchor word, and must recur (case-insensitively, within one line)
    after one of ``kw_ends``, tried in order. An empty group always recurs. The group cannot
    span a newline. For a fixed group end, a group that recurs still recurs when shortened from
    the left, so the earliest start is found by bisection.
    """
    count, pos = 0, 0
    while True:
        best: tuple[int, int] | None = None  # (match start, match end)
        for e, kw_ends in _group_ends(anchors, pos):
            lo = max(pos, text.rfind("\n", 0, e) + 1)
            if best is not None and lo >= best[0]:
                break  # group ends are visited in order, so later ones cannot start earlier
            hi = e  # the empty group at e always recurs
            while lo < hi:
                mid = (lo + hi) // 2
                if _recur_end(text, low, mid, e, kw_ends) is None:
                    lo = mid + 1
                else:
                    hi = mid
            if best is None or lo < best[0]:
                end = _recur_end(text, low, lo, e, kw_ends)
                assert end is not None
                best = (lo, end)
        if best is None:
            return count
        count += 1
        pos = best[1]


def _group_ends(
    anchors: list[tuple[int, int, list[int]]], pos: int
) -> Iterator[tuple[int, list[int]]]:
    for w0, wb, kw_ends in anchors:
        if wb > pos and kw_ends:
            for e in range(max(w0, pos), wb):
                yield e, kw_ends


def _recur_end(text: str, low: str, s: int, e: int, kw_ends: list[int]) -> int | None:
    """End of the match if ``low[s:e]`` recurs after one of ``kw_ends`` (the first that works)
    before that keyword's line ends, else None."""
    for k in kw_ends:
        if e == s:
            return k
        newline = text.find("\n", k)
        j = low.find(low[s:e], k, len(text) if newline < 0 else newline)
        if j >= 0:
            return j + (e - s)
    return None


def _count_maybe_but_wait(text: str) -> int:
    """``len(_MAYBE_BUT_WAIT.findall(text))`` without its cubic backtracking.

    ``maybe\\s+(.*?)\\.\\s+But\\s+(?:wait|actually).*?maybe\\s+\\1``: the group starts after the
    whitespace that follows "maybe" (backtracking into that whitespace can only succeed where
    the greedy start already does, so it never changes a result), ends at the first
    ". But wait|actually" on its line for which some later "maybe<ws>" on the keyword's line is
    followed by the group again. A longer group recurs only where a shorter one does, so once a
    group end fails, the later ones whose keyword ends on the same line fail too.
    """
    low = _simple_lower(text)
    if low is None:
        return len(_MAYBE_BUT_WAIT.findall(text))
    maybes = []  # (start, end of the whitespace run after it)
    for m in _MAYBE.finditer(text):
        run_end = _WS_RUN.match(text, m.end()).end()  # type: ignore[union-attr]
        if run_end > m.end():
            maybes.append((m.start(), run_end))
    starts = [q for q, _ in maybes]
    dots = [(m.start(), m.end()) for m in _DOT_BUT_ANCHOR.finditer(text)]
    dot_starts = [d for d, _ in dots]

    def line_end(i: int) -> int:
        j = text.find("\n", i)
        return len(text) if j < 0 else j

    count, pos = 0, 0
    for s, r in maybes:
        if s < pos:
            continue
        limit = line_end(r)  # the group cannot contain a newline
        failed_line = -1
        for d, kw_end in dots[bisect_left(dot_starts, r) :]:
            if d >= limit:
                break
            kw_line = line_end(kw_end)
            if kw_line == failed_line:
                continue
            group = low[r:d]
            end = None
            # The next "maybe" must start on the keyword's line (.*? does not cross newlines).
            for q, q_run_end in maybes[bisect_left(starts, kw_end) :]:
                if q + 5 > kw_line:
                    break
                if low.startswith(group, q_run_end):
                    end = q_run_end + len(group)
                    break
            if end is not None:
                count += 1
                pos = end
                break
            failed_line = kw_line
    return count
