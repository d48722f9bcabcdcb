"""The caption tokenization of the COCO caption evaluation, in Python.

pycocoevalcap runs Stanford CoreNLP 3.4.1's `PTBTokenizer -preserveLines -lowerCase` (java) over every
caption, then drops the tokens in its punctuation list. This module reproduces that for the text captions
hold: words with inner hyphens, periods and slashes (`t-shirt`, `3.5-year-old`, `u.s.a`, `a/b`); numbers
(`1,000`, `4:30`, `-5`, `.5`; `2 1/2` one token joined by a no-break space, as CoreNLP does); clitics
split off (`dog 's`, `do n't`, `ca n't`, `i 'm`, `can not`, `gon na`); abbreviations that keep their period (`mr.`, `st.`, `etc.`, `u.s.`, single letters; some only
before a number, `no. 5`, or when capitalised, `Pa.`); quotes made directional (`` `` `` / `''`, `` ` `` /
`'`); brackets as `-lrb-`, `-rsb-`, ... (lower-cased by `-lowerCase`, so the punctuation list, which names
`-LRB-`, keeps them: a pycocoevalcap quirk we keep too); `...`, `--`, runs of `!`/`?` as one token; other
symbols alone (`$ 5`, `10 %`, `&`); `o'clock`, `ma'am`, `ol'`, `y' all`.

What it does not reproduce (the java lexer knows more): URLs and e-mail addresses, SGML tags, smileys,
Unicode escapes and most Unicode punctuation, "no." ending a caption (kept or split depending on the word
before it), "-7-11". `tests/eval/test_eval_tokenize.py` checks it against the real tokenizer, when java
is present, on tricky captions and on generated ones (12,000 generated captions, seeds 0-5, all equal).
"""

from __future__ import annotations

import re

# pycocoevalcap's list (tokenizer/ptbtokenizer.py): dropped after tokenization.
PUNCTUATION = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)

# Words that keep a following period: always, only before a number, only when capitalised (also words).
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr st ave etc vs jr sr prof gen col lt sgt capt rev hon co corp inc ltd bros jan feb mar apr "
    "jun jul aug sep sept oct nov dec mon tue wed thu fri ft mt rd blvd dept est sq tel univ cf al gov ph "
    "pres rep sen supt wm calif ariz mich minn conn fla ga kan ky md mo neb nev okla tenn va vt wis wyo mfg "
    "mlle mme messrs assn assoc dak adm brig cmdr comdr lieut maj sens esq atty bldg cie ste".split()
)
_BEFORE_NUMBER = frozenset("no fig pp art nos op ca".split())
_CAPITALISED = frozenset("ill mass la ore pa tex wash del".split())
_BRACKETS = {"(": "-LRB-", ")": "-RRB-", "[": "-LSB-", "]": "-RSB-", "{": "-LCB-", "}": "-RCB-"}
# CoreNLP 3.4.1 normalises currency signs and fractions.
_NORMALISED = {"€": "$", "£": "#", "½": "1/2", "¼": "1/4", "¾": "3/4"}
_SPLIT_WORDS = {"cannot": 3, "gonna": 3, "gotta": 3, "wanna": 3, "lemme": 3, "gimme": 3}  # where to cut

# A word: letters/digits (and underscores) joined by single hyphens, periods or slashes.
_WORD = re.compile(r"\w+(?:[-./]\w+)*")
_NUMBER_GROUPS = re.compile(r"\d+(?:[,:]\d+)+(?:\.\d+)?")  # 1,000  4:30  (10:30am -> 10:30 am)
_FRACTION_AFTER = re.compile(r" (\d+/\d+)(?![\w/])")
_SIGNED = re.compile(r"[-+]?\.?\d+(?:[.,:]\d+)*")  # -5, +5, .5, -4:30 at the start of a token
_ACRONYM = re.compile(r"[A-Za-z](?:\.[A-Za-z])*")  # u.s, e.g, a (an initial); not 3
_LETTER_APOSTROPHE_WORD = re.compile(r"[A-HJ-XZa-hj-xz]'[A-Za-z]{2,}")  # o'clock, o'neill (not i'll, y'all)
_VOWEL_APOSTROPHE_WORD = re.compile(r"[A-Za-z]+[aeiouyAEIOUY]'[aeiouAEIOU][A-Za-z]*")  # ma'am, MA'AM
_APOSTROPHE_END = re.compile(
    r"(?:[Oo]l|[yYlLdDjJ])'(?!(?:s|m|d|ll|re|ve)(?!\w))", re.IGNORECASE
)  # ol' man, y'all -> y' all
_OPENING_APOSTROPHE = re.compile(
    r"'n'?(?![\w.])|'(?:em|cause|till?|\d\ds)(?!\w)|'\d\d(?!\S)|'(?=\w)", re.IGNORECASE
)
_CLITIC = re.compile(r"'(?:s|m|d|ll|re|ve)(?!\w)", re.IGNORECASE)
_SYMBOL_WORD = re.compile(r"[#@][^\W\d_]\w*")  # #tag, @home (but # 1)


def tokenize(caption: str) -> str:
    """One caption as pycocoevalcap scores it: PTB tokens, lower-cased, punctuation dropped, one space apart.
    Newlines are spaces, as pycocoevalcap makes them (other line breaks, which would shift its java
    tokenizer's output lines against its captions, are spaces here too)."""
    lowered = (t.lower() for t in ptb_tokens(caption.replace("\n", " ")))
    return " ".join(t for t in lowered if t not in PUNCTUATION)


def ptb_tokens(line: str) -> list[str]:
    """PTB tokens of one line, before lower-casing (brackets as -LRB- etc.)."""
    tokens: list[str] = []
    i, n = 0, len(line)
    after_word = False  # the previous token is a word that ends right here: an apostrophe closes a quote
    while i < n:
        if line[i].isspace():
            i, after_word = i + 1, False
            continue
        at_start = not tokens or line[i - 1].isspace() or line[i - 1] in "\"'`([{"
        found, i, after_word = _next(line, i, after_word, at_start)
        tokens.extend(found)
    return tokens


def _next(line: str, i: int, after_word: bool, at_start: bool) -> tuple[list[str], int, bool]:
    """The token(s) starting at `line[i]`, where scanning resumes, and whether they end in a word."""
    c, rest = line[i], line[i:]
    for pair in ("``", "''", "--", "..."):
        if rest.startswith(pair):
            end = i + len(pair)
            while pair == "..." and end < len(line) and line[end] == ".":
                end += 1  # "...." is one ellipsis
            return [pair], end, False
    if c == "'":
        return _apostrophe(line, i, after_word)
    if c == '"':
        # Opening when a word follows at once, else closing (CoreNLP's latexQuotes).
        follows = i + 1 < len(line) and (line[i + 1].isalnum() or line[i + 1] in "$")
        return ["``" if follows else "''"], i + 1, False
    if at_start and (m := _SIGNED.match(line, i)) and c in "-+.":
        return [m.group()], m.end(), True
    if c in _BRACKETS:
        return [_BRACKETS[c]], i + 1, False
    if c in "?!":
        end = i + 1
        while end < len(line) and line[end] in "?!":
            end += 1
        return [line[i:end]], end, False
    if m := _SYMBOL_WORD.match(line, i):
        return [m.group()], m.end(), True
    if c in _NORMALISED:
        return [_NORMALISED[c]], i + 1, False
    if m := _NUMBER_GROUPS.match(line, i):
        return [m.group()], m.end(), True
    if m := (_LETTER_APOSTROPHE_WORD.match(line, i) or _VOWEL_APOSTROPHE_WORD.match(line, i)):
        if m.end() == len(line) or not line[m.end()].isalnum():
            return [m.group()], m.end(), True
    if m := _APOSTROPHE_END.match(line, i):
        return [m.group()], m.end(), False
    if m := _WORD.match(line, i):
        return _word(line, m.group(), m.end())
    return [c], i + 1, False  # any other character is a token of its own


def _word(line: str, word: str, end: int) -> tuple[list[str], int, bool]:
    """A word, split before `n't` and in `cannot`-like words, keeping a period that belongs to it."""
    if (
        line[end : end + 2].lower() == "'t"
        and word[-1:] in "nN"
        and len(word) > 1
        and not _more(line, end + 2)
    ):
        return [word[:-1], word[-1] + line[end : end + 2]], end + 2, True
    if word.isdigit() and (m := _FRACTION_AFTER.match(line, end)):  # "2 1/2": one token, CoreNLP's NBSP
        return [f"{word}\u00a0{m.group(1)}"], m.end(), True
    if word.lower() in _SPLIT_WORDS and not _CLITIC.match(line, end):  # gonna's stays whole
        cut = _SPLIT_WORDS[word.lower()]
        return [word[:cut], word[cut:]], end, True
    if end < len(line) and line[end] == "." and _keeps_period(word, line[end + 1 :]):
        return [word + "."], end + 1, True
    return [word], end, True


def _keeps_period(word: str, after: str) -> bool:
    """Whether `word.` is one token: an acronym or initial (u.s., e.g., a.), or a known abbreviation."""
    lower = word.lower()
    if _ACRONYM.fullmatch(word) or lower in _ABBREVIATIONS:
        return True
    if lower in _BEFORE_NUMBER:
        return bool(re.match(r"\s*\d|[,;:]", after))
    return lower in _CAPITALISED and word[0].isupper()


def _apostrophe(line: str, i: int, after_word: bool) -> tuple[list[str], int, bool]:
    """A token starting with an apostrophe: a clitic ('s, 're), a closing quote after a word ('), else a
    contracted word ('em, 'n', '90s, 't of 'tis), an opening quote (`) or a lone apostrophe (')."""
    if m := _CLITIC.match(line, i):  # wherever it is: "dog's", "dog 's", "10%'s"
        return [m.group()], m.end(), True
    if after_word:
        if line[i : i + 3].lower() == "'n'":  # rock'n'roll
            return [line[i : i + 3]], i + 3, False
        return ["'"], i + 1, False
    if line[i : i + 4].lower() in ("'tis", "'twa"):
        return [line[i : i + 2]], i + 2, True
    if m := _OPENING_APOSTROPHE.match(line, i):
        return ([m.group()], m.end(), True) if m.end() > i + 1 else (["`"], i + 1, False)
    return ["'"], i + 1, False


def _more(line: str, i: int) -> bool:
    return i < len(line) and line[i].isalnum()
