"""Prompt preprocessing of Open-Sora v1.2 (spec §0 step 1, §3): scores appended, then caption cleaning twice.

Open-Sora's ``scripts/inference.py`` turns a user prompt into the text that T5 sees in this order:

1. split a loop prompt ``"|0| a |2| b"`` into segments (each segment is processed on its own);
2. append ``" aesthetic score: 6.5."`` (config ``aes``; also ``motion score`` / ``camera motion`` when set),
   each only if the prompt does not already contain that phrase;
3. clean the caption **twice** with PixArt's / DeepFloyd's ``clean_caption`` (lower-cases, removes URLs, HTML,
   @mentions, CJK ideographs, product codes, odd punctuation, ...);
4. merge loop segments back as ``"|0|a|2|b"``.

So ``"A beautiful waterfall"`` becomes ``"a beautiful waterfall aesthetic score: 6.5."``.

``clean_caption`` here is a re-implementation of the original's *behaviour* (the original is AGPL-3.0; this
file is written from a description of its steps). Its steps, in order, are listed in ``clean_caption``'s
docstring. The original depends on two libraries:

- ``ftfy.fix_text`` is called as the original calls it (``ftfy`` is in the ``hf`` extra): entity unescaping,
  terminal escapes, C1 controls, ligatures and full-width forms, curly quotes, line breaks, surrogates, control
  characters, NFC, mojibake repair (which rarely fires here: as in the original, the caption is lower-cased and
  stripped of ``©`` and other symbols before this step).
- BeautifulSoup (``html.parser``) ``.text`` -> ``_html_text``: the text of all data nodes from the standard
  library's ``html.parser`` (the same tokenizer BeautifulSoup's ``html.parser`` builder uses), entities
  unescaped, CDATA kept, comments / declarations / processing instructions and the contents of
  ``<script>``/``<style>``/``<template>`` dropped (as bs4 >= 4.10's ``get_text`` does): BeautifulSoup is not
  a dependency, and this one step needs only the standard library.
"""

from __future__ import annotations

import html
import math
import re
import urllib.parse
from html.parser import HTMLParser
from numbers import Real

AESTHETIC_SUFFIX = " aesthetic score: 6.5."  # what Open-Sora v1.2 appends with its default aes = 6.5
DEFAULT_AES = 6.5

# -- clean_caption ------------------------------------------------------------------------------------------

_TLDS = ("com", "co", "ru", "net", "org", "edu", "gov", "it")
# A dotted host ending in one of _TLDS (then any path), not directly followed by "@".
_HOST = r"[a-zA-Z0-9.\-]+\.(?:" + "|".join(_TLDS) + r")[\w/-]*\b/?(?!@)"


def _url_re(scheme: str) -> re.Pattern[str]:
    # At a word start: either the scheme prefix only ("https://", "http:x"), or a whole dotted host + path.
    return re.compile(r"\b(?:" + scheme + r":(?:/{1,3}|[a-zA-Z0-9%])|" + _HOST + r")")


_URLS = (_url_re(r"https?"), _url_re(r"www"))
_MENTION = re.compile(r"@\w+")
# CJK strokes, katakana phonetic extensions, enclosed CJK, CJK compatibility, ideographs (ext. A, Yijing
# hexagrams, unified): U+31C0..U+9FFF as one contiguous range. Hiragana / katakana (U+3040..U+30FF) stay.
_CJK = re.compile("[\u31c0-\u9fff]+")
# Dash punctuation (Unicode category Pd as of Unicode 11) -> one ASCII hyphen per run.
_DASH_CODEPOINTS = (0x2D, 0x58A, 0x5BE, 0x1400, 0x1806, *range(0x2010, 0x2016), 0x2E17, 0x2E1A, 0x2E3A,
                    0x2E3B, 0x2E40, 0x301C, 0x3030, 0x30A0, 0xFE31, 0xFE32, 0xFE58, 0xFE63, 0xFF0D)
_DASHES = re.compile("[" + "".join(re.escape(chr(c)) for c in _DASH_CODEPOINTS) + "]+")
_TO_DOUBLE_QUOTE = re.compile("[`\u00b4\u00ab\u00bb\u201c\u201d\u00a8]")  # ` ´ « » “ ” ¨
_TO_SINGLE_QUOTE = re.compile("[\u2018\u2019]")  # ‘ ’
_IMAGE_EXTS = ("png", "jpg", "jpeg", "bmp", "webp", "eps", "pdf", "apk", "mp4")
_EXT = "(?:" + "|".join(_IMAGE_EXTS) + ")"
# Runs of these become one space: # ® • © ™ & @ · º ½ ¾ ¿ ¡ § ~ ( ) [ ] { } | \ / *
_BAD_PUNCT = re.compile("[" + re.escape("#®•©™&@·º½¾¿¡§~)(][}{|\\/*") + "]+")
_DASH_OR_UNDERSCORE = re.compile(r"[-_]")

# (pattern, replacement) applied in order, before and after the text fix-up (basic clean).
_NOISE_STEPS: tuple[tuple[re.Pattern[str], str], ...] = tuple((re.compile(p), r) for p, r in (
    (r"&quot;?", ""),                              # left-over escaped quotes
    (r"&amp", ""),                                 # left-over escaped ampersands
    (r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " "),  # IPv4 addresses
    (r"\d:\d\d\s+$", ""),                          # a trailing "1:23 " (article ids, times)
    (r"\\n", " "),                                 # a literal backslash-n
    (r"#\d{1,3}\b", ""),                           # "#12"
    (r"#\d{5,}\b", ""),                            # "#123456"
    (r"\b\d{6,}\b", ""),                           # long numbers
    (r"\S+\." + _EXT, ""),                         # file names
    (r"[\"']{2,}", '"'),                           # runs of quotes
    (r"\.{2,}", " "),                              # ellipses
))
_CODE_STEPS: tuple[tuple[re.Pattern[str], str], ...] = tuple((re.compile(p), r) for p, r in (
    (r"\b[a-zA-Z]{1,3}\d{3,15}\b", ""),            # "jc6640"
    (r"\b[a-zA-Z]+\d+[a-zA-Z]+\b", ""),            # "jc6640vc"
    (r"\b\d+[a-zA-Z]+\d+\b", ""),                  # "6640vc231"
    (r"(worldwide\s+)?(free\s+)?shipping", ""),    # shop boilerplate (no word boundaries, as the original)
    (r"(free\s)?download(\sfree)?", ""),
    (r"\bclick\b\s(?:for|on)\s\w+", ""),
    (r"\b" + _EXT + r"(\simages?)?", ""),          # "jpg images"; also prefixes: "epsilon" -> "ilon"
    (r"\bpage\s+\d+\b", ""),
    (r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b", " "),  # "j2d1a2a"
    (r"\b\d+\.?\d*[xх×]\d+\.?\d*\b", ""),          # sizes "1920x1080" (latin x, cyrillic х, ×)
    (r"\b\s+:\s+", ": "),                          # "a : b" -> "a: b"
    (r"(\D[,./])\b", r"\1 "),                      # a space after , . / before a word
    (r"\s+", " "),
))
_EDGE_STEPS: tuple[tuple[re.Pattern[str], str], ...] = tuple((re.compile(p), r) for p, r in (
    (r"^[\"']([\w\W]+)[\"']$", r"\1"),             # one pair of enclosing quotes
    (r"^['_,\-:;]", ""),                           # one leading ' _ , - : ;
    (r"['_,\-:+]$", ""),                           # one trailing ' _ , - : +
    (r"^\.\S+$", ""),                              # a lone ".word"
))


class _TextExtractor(HTMLParser):
    """Collects the text of an HTML fragment like BeautifulSoup(html.parser).text (see the module docstring)."""

    _SKIP = frozenset({"script", "style", "template"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip_depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._SKIP:
            self._skip_depth += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP and self._skip_depth:
            self._skip_depth -= 1

    def handle_data(self, data: str) -> None:
        if not self._skip_depth:
            self.parts.append(data)

    def unknown_decl(self, data: str) -> None:
        if data.startswith("CDATA["):
            self.parts.append(data[len("CDATA["):])


def _html_text(text: str) -> str:
    parser = _TextExtractor()
    parser.feed(text)
    parser.close()
    return "".join(parser.parts)


def _fix_text(text: str) -> str:
    """``ftfy.fix_text``, as the original calls it (ftfy is in the ``hf`` extra)."""
    try:
        import ftfy
    except ImportError:
        raise ImportError("Open-Sora's caption cleaning needs ftfy; fix: pip install 'blockrt[hf]'") from None
    return ftfy.fix_text(text)


def _sub_all(text: str, steps: tuple[tuple[re.Pattern[str], str], ...]) -> str:
    for pattern, repl in steps:
        text = pattern.sub(repl, text)
    return text


def clean_caption(text: str) -> str:
    """One pass of PixArt / DeepFloyd caption cleaning, as Open-Sora v1.2 applies it (behavioural re-implementation).

    Steps, in the original's order:

    1. percent-decode (``+`` -> space), strip, **lower-case**; ``<person>`` -> ``person``;
    2. URLs: a scheme prefix (``https://``, ``www:``) and dotted hosts ending in .com/.co/.ru/.net/.org/.edu/
       .gov/.it with their path are removed (hosts with other endings keep their name);
    3. HTML: tags dropped, entities unescaped (``_html_text``);
    4. ``@mentions`` removed; CJK ideographs / strokes / enclosed / compatibility characters removed;
    5. every kind of dash -> ``-`` (runs collapse); ``` ` ´ « » “ ” ¨``` -> ``"``; ``‘ ’`` -> ``'``;
    6. noise: left-over ``&quot``/``&amp``, IP addresses, a trailing ``d:dd``, literal ``\\n``, ``#123`` /
       ``#12345...`` hashtags of digits, numbers of 6+ digits, file names (``x.jpg``), quote runs -> ``"``,
       ``..`` runs -> space;
    7. runs of ``# ® • © ™ & @ · º ½ ¾ ¿ ¡ § ~ ( ) [ ] { } | \\ / *`` -> space; ``" . "`` -> space;
       more than three ``-``/``_`` in the text -> all of them become spaces (``this-is-my-cute-cat``);
    8. ``ftfy.fix_text``, HTML-unescape twice, strip;
    9. product codes (``jc6640``, ``6640vc231``...), shop boilerplate (``free shipping``, ``download``,
       ``click for ...``, ``jpg images``, ``page 3``), sizes (``1920x1080``);
    10. ``" : "`` -> ``": "``, a space after ``,``/``.``/``/`` glued to the next word, whitespace runs -> one
        space; then one pair of enclosing quotes, one leading ``' _ , - : ;``, one trailing ``' _ , - : +`` and
        a lone ``.word`` are removed; strip.

    Example:
        >>> clean_caption("A <b>Beautiful</b>   waterfall, see https://example.com/x!")
        'a beautiful waterfall, see !'
    """
    if not isinstance(text, str):
        raise TypeError(f"caption must be a str, got {type(text).__name__}")
    text = urllib.parse.unquote_plus(text).strip().lower()
    text = text.replace("<person>", "person")
    for url in _URLS:
        text = url.sub("", text)
    text = _html_text(text)
    text = _MENTION.sub("", text)
    text = _CJK.sub("", text)
    text = _DASHES.sub("-", text)
    text = _TO_SINGLE_QUOTE.sub("'", _TO_DOUBLE_QUOTE.sub('"', text))
    text = _sub_all(text, _NOISE_STEPS)
    text = _BAD_PUNCT.sub(" ", text)
    text = re.sub(r"\s+\.\s+", " ", text)
    if len(_DASH_OR_UNDERSCORE.findall(text)) > 3:
        text = _DASH_OR_UNDERSCORE.sub(" ", text)
    text = html.unescape(html.unescape(_fix_text(text))).strip()
    text = _sub_all(text, _CODE_STEPS)
    # The original does not strip here (its strip() result is discarded): a leading space blocks the
    # edge steps below, and we keep that.
    text = _sub_all(text, _EDGE_STEPS)
    return text.strip()


# -- scores, loop prompts, the full preprocessing ------------------------------------------------------------


def _check_score(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number (Open-Sora v1.2 uses aes=6.5), got {value!r}")
    return float(value)


def append_scores(prompt: str, aes: float | None = DEFAULT_AES, flow: float | None = None,
                  camera_motion: str | None = None) -> str:
    """Append ``" aesthetic score: {aes:.1f}."``, ``" motion score: {flow:.1f}."`` and ``" camera motion: {cm}."``
    (those not None), each only if the prompt does not already contain ``"aesthetic score:"`` etc. (as Open-Sora)."""
    if aes is not None and "aesthetic score:" not in prompt:
        prompt = f"{prompt} aesthetic score: {_check_score('aes', aes):.1f}."
    if flow is not None and "motion score:" not in prompt:
        prompt = f"{prompt} motion score: {_check_score('flow', flow):.1f}."
    if camera_motion is not None and "camera motion:" not in prompt:
        prompt = f"{prompt} camera motion: {camera_motion}."
    return prompt


def split_loop_prompts(prompt: str) -> tuple[list[str], list[int] | None]:
    """``"|0| a day |2| a night"`` -> ``(["a day", "a night"], [0, 2])``; any other prompt -> ``([prompt], None)``.

    The ``|k|`` syntax of Open-Sora's loop generation: segment i is used from loop k_i until the next segment's k.
    """
    if not prompt.startswith("|0|"):
        return [prompt], None
    fields = prompt.split("|")[1:]  # ["0", " a day ", "2", " a night"]
    if len(fields) % 2:
        raise ValueError(f"loop prompt {prompt!r} must alternate |k| and text, e.g. '|0| a day |2| a night'")
    texts, starts = [], []
    for k, text in zip(fields[0::2], fields[1::2]):
        try:
            start = int(k)
        except ValueError:
            raise ValueError(f"loop prompt {prompt!r}: {k!r} between '|' is not a loop index") from None
        if starts and start <= starts[-1]:
            raise ValueError(f"loop prompt {prompt!r}: loop indices must increase, got {start} after {starts[-1]}")
        if not text.strip():
            raise ValueError(f"loop prompt {prompt!r}: segment |{start}| has no text")
        texts.append(text.strip())
        starts.append(start)
    return texts, starts


def merge_loop_prompts(texts: list[str], starts: list[int] | None) -> str:
    """Inverse of ``split_loop_prompts`` in Open-Sora's compact form: ``"|0|a day|2|a night"``."""
    if starts is None:
        return texts[0]
    return "".join(f"|{k}|{t}" for k, t in zip(starts, texts))


def loop_prompt(prompt: str, loop_index: int) -> str:
    """The prompt of loop ``loop_index`` (0-based) of a (merged) loop prompt; a plain prompt is every loop's."""
    texts, starts = split_loop_prompts(prompt)
    if starts is None:
        return prompt
    active = [t for t, k in zip(texts, starts) if k <= loop_index]
    if not active:
        raise ValueError(f"loop index {loop_index} is before the first segment of {prompt!r}")
    return active[-1]


def preprocess(prompt: str, aes: float | None = DEFAULT_AES, *, flow: float | None = None,
               camera_motion: str | None = None) -> str:
    """Open-Sora v1.2's prompt -> T5 text: append the scores, then ``clean_caption`` twice (per loop segment).

    The order is the original's: the suffix is appended *before* cleaning, so it is cleaned too (it survives
    unchanged: ``" aesthetic score: 6.5."``).

    Args:
        prompt: the user's text; a ``"|0| ... |k| ..."`` loop prompt is processed segment by segment.
        aes: aesthetic score to append (Open-Sora v1.2 default 6.5); None appends nothing.
        flow, camera_motion: Open-Sora's optional motion score / camera motion phrases (unset by default).

    Raises:
        ValueError: the prompt is empty or blank, or nothing of it survives the caption cleaning.

    Example:
        >>> preprocess("A beautiful waterfall")
        'a beautiful waterfall aesthetic score: 6.5.'
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    if not prompt.strip():
        raise ValueError("prompt is empty: give a text description of the video, e.g. 'a beautiful waterfall'")
    texts, starts = split_loop_prompts(prompt)
    out = []
    for text in texts:
        if not clean_caption(clean_caption(text)):
            raise ValueError(f"prompt {text!r} is empty after caption cleaning (Open-Sora removes URLs, HTML, "
                             "@mentions, CJK ideographs, codes and odd punctuation): describe the video in words")
        out.append(clean_caption(clean_caption(append_scores(text, aes, flow, camera_motion))))
    return merge_loop_prompts(out, starts)
