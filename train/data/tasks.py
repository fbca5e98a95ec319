"""Task generators: each turns a seeded RNG (+ the real-text corpus) into a text-level :class:`Sample`.

Tasks (names used by the mixture and stored with every item):

* ``lm``          language-modelling continuation: context = the first part of a long real text,
                  no prompt, target = the next 128-512 tokens.
* ``passkey``     a pass key hidden at a random depth of real-text filler.
* ``needle``      one to five "needle" facts (magic numbers, secret ingredients, ...) at random depths;
                  the question asks for one of them, the others are distractors.
* ``kv``          key-value retrieval: a JSON object of random UUID pairs (optionally inside filler).
* ``quote``       quote completion: the start of a sentence of the document, the answer is its end.
* ``extractive``  "What does the document say about X?" -> the (unique) sentence that mentions X.
* ``contract``    questions over generated agreements (see :mod:`.contracts`), padded to length with an
                  annex of real documentation or bundled with other agreements (distractors).
* ``chat``        multi-turn conversations over a contract or a real document; earlier turns are part
                  of the prompt, the loss is on the last answer only; sometimes the last question asks
                  about a topic the document does not cover, and the answer says so.

Every generator gets ``ctx_tokens`` (the wanted context length) and a :class:`Tokens` helper that
counts and cuts text with the real tokenizer, and returns ``None`` when it cannot make an item from
what it drew (the caller retries with a derived seed).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from random import Random

from .contracts import generate_contract
from .sources import Corpus

TASKS = ("lm", "passkey", "needle", "kv", "quote", "extractive", "contract", "chat")
# tasks whose ``evidence`` must occur verbatim in the context
EXTRACTIVE_TASKS = ("passkey", "needle", "kv", "quote", "extractive", "contract", "chat")

DEFAULT_SOURCE_WEIGHTS = {"man": 0.30, "man-gcloud": 0.08, "pydoc": 0.10, "docstrings": 0.32, "pkgdocs": 0.20}


@dataclass
class Sample:
    task: str
    context: str
    messages: list[dict] = field(default_factory=list)  # conversation ending with the user's question
    answer: str = ""
    evidence: str | None = None  # verbatim substring of ``context`` that supports the answer
    source: str = ""
    context_ids: list[int] | None = None  # set by the LM task (exact token-level split)
    target_ids: list[int] | None = None
    meta: dict = field(default_factory=dict)


class Tokens:
    """Token counting / cutting with the model's tokenizer (no special tokens)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def count(self, text: str) -> int:
        return len(self.encode(text))

    def cut(self, text: str, n_tokens: int, snap: bool = True) -> str:
        """The prefix of ``text`` covering its first ``n_tokens`` tokens (snapped back to a paragraph,
        line or sentence end when one is near)."""
        head = text[: n_tokens * 12 + 64]  # tokens are rarely longer than 12 characters
        enc = self.tok(head, add_special_tokens=False, return_offsets_mapping=True)
        offs = enc["offset_mapping"]
        if len(offs) <= n_tokens:
            if len(head) == len(text):
                return text
            enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
            offs = enc["offset_mapping"]
            if len(offs) <= n_tokens:
                return text
        end = offs[max(0, n_tokens - 1)][1]
        out = text[:end]
        if snap:
            for sep in ("\n\n", "\n", ". "):
                k = out.rfind(sep)
                if k > 0.9 * len(out):
                    return out[: k + (1 if sep == ". " else 0)]
        return out


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------

def pick_source(rng: Random, corpus: Corpus, weights: dict[str, float] | None = None) -> str | None:
    weights = weights or DEFAULT_SOURCE_WEIGHTS
    avail = [(s, w) for s, w in weights.items() if s in corpus.entries and w > 0]
    if not avail:
        avail = [(s, 1.0) for s in corpus.sources]
    if not avail:
        return None
    return rng.choices([s for s, _ in avail], weights=[w for _, w in avail])[0]


def real_text(rng: Random, corpus: Corpus, tk: Tokens, n_tokens: int, weights=None) -> tuple[str, str] | None:
    """About ``n_tokens`` tokens of real text (one or several neighbouring documents)."""
    src = pick_source(rng, corpus, weights)
    if src is None:
        return None
    doc = corpus.long_text(rng, src, min_chars=int(n_tokens * 4.6) + 200)
    if doc is None:
        return None
    return tk.cut(doc.text, n_tokens), doc.name


def _boundaries(text: str) -> list[int]:
    """Character positions where an insertion looks natural (paragraph starts)."""
    pos = [0] + [m.end() for m in re.finditer(r"\n\n", text)] + [len(text)]
    return sorted(set(pos))


def insert_at_depth(text: str, needle: str, depth: float) -> tuple[str, float]:
    """Insert ``needle`` as its own paragraph at the paragraph boundary nearest to ``depth``."""
    bs = _boundaries(text)
    target = depth * len(text)
    at = min(bs, key=lambda b: abs(b - target))
    before, after = text[:at].rstrip("\n"), text[at:].lstrip("\n")
    out = (before + "\n\n" if before else "") + needle + ("\n\n" + after if after else "")
    return out, (at / max(1, len(text)))


_SENT_RE = re.compile(r"(?:^|(?<=[.!?] )|(?<=[.!?]  ))([A-Z][^\n]{30,280}?[.!?])(?=\s|$)", re.M)


def sentences(text: str) -> list[tuple[int, str]]:
    """Prose-looking single-line sentences (start offset, sentence) that occur exactly once."""
    out = []
    for m in _SENT_RE.finditer(text):
        s = m.group(1)
        letters = sum(c.isalpha() or c == " " for c in s)
        if letters < 0.85 * len(s) or len(s.split()) < 7 or s.count("(") != s.count(")"):
            continue
        if re.search(r"\b(e\.g|i\.e|etc|vs|cf|Dr|Mr|Mrs|No)\.$", s):
            continue
        out.append((m.start(1), s))
    if not out:
        return out
    return [(i, s) for i, s in out if text.count(s) == 1]


_STOP = frozenset("""a about above after again against all also an and any are as at be because been before
being below between both but by can could did do does doing done down during each either else every few for
from further had has have having here how however if in into is it its itself just may might more most must
no nor not now of off on once only or other our out over own same see set should since so some such than that
the their them then there these they this those through thus to too under until up upon use used uses using
very via was we were what when where whether which while who whom why will with within without would you your
value values default option options function functions return returns returned string object objects number
command commands example examples argument arguments specified following program instead always given first
new one two three file files name names type types list data time way make makes made like well need needs
also""".split())

_IDENT_RE = re.compile(r"(?<![\w-])--?[A-Za-z][\w-]{2,}|\b[A-Za-z_]\w*_\w+\b|\b[a-z]+[A-Z]\w*\b|\b[A-Z][a-z]+[A-Z]\w*\b"
                       r"|\b\w+\(\)|\b[A-Z]{3,}\w*\b|\b[A-Za-z]+\d\w*\b")
_WORD_RE = re.compile(r"[A-Za-z][A-Za-z'\u2019-]*[A-Za-z]|[A-Za-z]")


def _occurs_once(term: str, text: str) -> bool:
    if text.count(term) != 1:
        return False
    pat = (r"(?<![\w-])" if term[0].isalnum() or term[0] == "_" else "") + re.escape(term) + \
        (r"(?![\w-])" if term[-1].isalnum() or term[-1] == "_" else "")
    return len(re.findall(pat, text, flags=re.IGNORECASE)) == 1


def key_term(rng: Random, sentence: str, text: str) -> str | None:
    """A distinctive term of ``sentence`` that occurs exactly once in ``text``: an identifier-like
    token (option, snake_case, CamelCase, call, ALLCAPS) if there is one, else a two- or three-word
    phrase that neither starts nor ends with a function word."""
    idents = [w for w in dict.fromkeys(m.group(0) for m in _IDENT_RE.finditer(sentence))
              if len(w) >= 4 and _occurs_once(w, text)]
    if idents:
        return rng.choice(idents)
    words = [m.group(0) for m in _WORD_RE.finditer(sentence)]
    phrases = []
    for n in (2, 3):
        for i in range(len(words) - n + 1):
            ws = words[i:i + n]
            if ws[0].lower() in _STOP or ws[-1].lower() in _STOP or max(len(w) for w in ws) < 6:
                continue
            phrase = " ".join(ws)
            if phrase in sentence and _occurs_once(phrase, text):
                phrases.append(phrase)
    if not phrases:
        return None
    return rng.choice(phrases)


def _user(q: str) -> list[dict]:
    return [{"role": "user", "content": q}]


# ------------------------------------------------------------------------------------------------
# Tasks
# ------------------------------------------------------------------------------------------------

def task_lm(rng: Random, corpus: Corpus, tk: Tokens, ctx_tokens: int, weights=None) -> Sample | None:
    tgt = rng.randint(128, 512)
    src = pick_source(rng, corpus, weights)
    if src is None:
        return None
    doc = corpus.long_text(rng, src, min_chars=int((ctx_tokens + tgt) * 4.6) + 400)
    if doc is None:
        return None
    ids = tk.encode(doc.text[: int((ctx_tokens + tgt) * 8) + 1000])
    if len(ids) < ctx_tokens + tgt:
        ctx_tokens = len(ids) - tgt  # a shorter context (the packer rejects it if below min_ctx)
        if ctx_tokens <= 0:
            return None
    return Sample("lm", context="", source=doc.name, context_ids=ids[:ctx_tokens],
                  target_ids=ids[ctx_tokens: ctx_tokens + tgt], meta={"doc": doc.name})


_PASSKEY_TEMPLATES = [
    "The pass key is {k}. Remember it. {k} is the pass key.",
    "Important: the passkey is {k}. Keep it safe; the passkey is {k}.",
    "Note to the reader: the secret access code is {k}. The access code is {k}.",
]
_PASSKEY_Q = ["What is the pass key?", "What is the passkey mentioned in the document?",
              "What is the secret access code?", "Find the pass key hidden in the document. What is it?"]


def task_passkey(rng: Random, corpus: Corpus, tk: Tokens, ctx_tokens: int, weights=None) -> Sample | None:
    k = str(rng.randint(10_000, 9_999_999))
    t = rng.randrange(len(_PASSKEY_TEMPLATES))
    needle = _PASSKEY_TEMPLATES[t].format(k=k)
    got = real_text(rng, corpus, tk, ctx_tokens - tk.count(needle) - 8, weights)
    if got is None:
        return None
    hay, name = got
    depth = rng.random()
    ctx, real_depth = insert_at_depth(hay, needle, depth)
    q = _PASSKEY_Q[2] if t == 2 else rng.choice([_PASSKEY_Q[0], _PASSKEY_Q[1], _PASSKEY_Q[3]])
    ans = rng.choice([k, f"The pass key is {k}." if t != 2 else f"The access code is {k}."])
    return Sample("passkey", ctx, _user(q), ans, evidence=k, source=name, meta={"depth": round(real_depth, 3)})


_CITIES = ["Lisbon", "Oslo", "Nairobi", "Quito", "Hanoi", "Tbilisi", "Reykjavik", "Montevideo", "Auckland", "Krakow",
           "Marrakesh", "Valparaiso", "Tallinn", "Osaka", "Bergen", "Cusco", "Ljubljana", "Halifax", "Perth", "Porto"]
_THINGS = ["lantern", "compass", "violin", "teapot", "glacier", "orchid", "typewriter", "kite", "anchor", "telescope",
           "harp", "canoe", "beehive", "clocktower", "lighthouse", "marble", "saddle", "chessboard", "satchel", "quill"]
_INGR = ["smoked paprika", "cardamom", "tamarind", "star anise", "black garlic", "yuzu zest", "sumac", "saffron",
         "miso", "juniper berries", "fenugreek", "pink peppercorns"]


def _needle_fact(rng: Random, used: set) -> tuple[str, str, str, str] | None:
    for _ in range(20):
        kind = rng.randrange(3)
        if kind == 0:
            c = rng.choice(_CITIES)
            v = str(rng.randint(100_000, 9_999_999))
            key = ("city", c)
            s, q = f"The special magic number for {c} is: {v}.", f"What is the special magic number for {c}?"
        elif kind == 1:
            c = rng.choice(_THINGS)
            v = f"{rng.choice(['amber', 'cobalt', 'crimson', 'ivory', 'jade', 'onyx', 'saffron', 'teal'])}-{rng.randint(10, 99)}"
            key = ("thing", c)
            s, q = f"The registration code of the {c} is {v}.", f"What is the registration code of the {c}?"
        else:
            p = f"{rng.choice(['Aunt', 'Uncle', 'Chef', 'Captain', 'Professor'])} {rng.choice(_CITIES)}"
            v = rng.choice(_INGR)
            key = ("ingr", p)
            s, q = f"The secret ingredient in {p}'s famous stew is {v}.", f"What is the secret ingredient in {p}'s famous stew?"
        if key not in used:
            used.add(key)
            return s, q, v, key[0]
    return None


def task_needle(rng: Random, corpus: Corpus, tk: Tokens, ctx_tokens: int, weights=None) -> Sample | None:
    n = rng.choice([1, 1, 2, 3, 5])
    used: set = set()
    facts = [f for f in (_needle_fact(rng, used) for _ in range(n)) if f]
    need = sum(tk.count(f[0]) + 4 for f in facts)
    got = real_text(rng, corpus, tk, ctx_tokens - need - 8, weights)
    if got is None or not facts:
        return None
    ctx, name = got
    depths = []
    for s, _q, _v, _k in facts:
        ctx, d = insert_at_depth(ctx, s, rng.random())
        depths.append(round(d, 3))
    i = rng.randrange(len(facts))
    s, q, v, _ = facts[i]
    ans = rng.choice([v, s])
    return Sample("needle", ctx, _user(q), ans, evidence=v if ans == v else s, source=name,
                  meta={"n_needles": len(facts), "depth": depths[i]})


def task_kv(rng: Random, corpus: Corpus, tk: Tokens, ctx_tokens: int, weights=None) -> Sample | None:
    def uid() -> str:
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))

    pair_tokens = 52  # measured: two UUIDs with JSON punctuation
    embed = rng.random() < 0.4
    budget = ctx_tokens // (3 if embed else 1)
    n = max(4, (budget - 20) // pair_tokens)
    pairs = [(uid(), uid()) for _ in range(n)]
    obj = "{\n" + ",\n".join(f"  \"{k}\": \"{v}\"" for k, v in pairs) + "\n}"
    while tk.count(obj) > budget and len(pairs) > 4:
        pairs = pairs[: int(len(pairs) * 0.9)]
        obj = "{\n" + ",\n".join(f"  \"{k}\": \"{v}\"" for k, v in pairs) + "\n}"
    name = "kv"
    if embed:
        got = real_text(rng, corpus, tk, ctx_tokens - tk.count(obj) - 16, weights)
        if got is None:
            return None
        hay, name = got
        ctx, _ = insert_at_depth(hay, "JSON data:\n" + obj, rng.random())
    else:
        ctx = "JSON data:\n" + obj
    i = rng.randrange(len(pairs))
    k, v = pairs[i]
    q = rng.choice([f"Extract the value corresponding to the specified key in the JSON object. Key: \"{k}\"",
                    f"In the JSON data, what is the value for the key \"{k}\"?"])
    return Sample("kv", ctx, _user(q), v, evidence=f"\"{k}\": \"{v}\"", source=name,
                  meta={"n_pairs": len(pairs), "depth": round(i / len(pairs), 3)})


def task_quote(rng: Random, corpus: Corpus, tk: Tokens, ctx_tokens: int, weights=None) -> Sample | None:
    got = real_text(rng, corpus, tk, ctx_tokens, weights)
    if got is None:
        return None
    ctx, name = got
    sents = sentences(ctx)
    if not sents:
        return None
    off, s = rng.choice(sents)
    words = s.split(" ")
    cut = max(3, int(len(words) * rng.uniform(0.3, 0.6)))
    head, tail = " ".join(words[:cut]), " ".join(words[cut:])
    if not tail or ctx.count(head) != 1:
        return None
    q = rng.choice([f"Complete the following sentence exactly as it appears in the document: \"{head} ...\"",
                    f"The document contains a sentence starting with \"{head}\". How does it continue?",
                    f"Continue this quote from the document: \"{head}\""])
    return Sample("quote", ctx, _user(q), tail, evidence=s, source=name, meta={"depth": round(off / len(ctx), 3)})


def _extractive_qa(rng: Random, ctx: str) -> tuple[str, str, float] | None:
    sents = sentences(ctx)
    rng.shuffle(sents)
    for off, s in sents[:30]:
        term = key_term(rng, s, ctx)
        if term:
            q = rng.choice([f"What does the document say about {term}?",
                            f"What does the document say about \"{term}\"? Quote the relevant sentence.",
                            f"Which sentence of the document mentions {term}?",
                            f"Find the passage about {term} and quote it."])
            return q, s, off / len(ctx)
    return None


def task_extractive(rng: Random, corpus: Corpus, tk: Tokens, ctx_tokens: int, weights=None) -> Sample | None:
    got = real_text(rng, corpus, tk, ctx_tokens, weights)
    if got is None:
        return None
    ctx, name = got
    qa = _extractive_qa(rng, ctx)
    if qa is None:
        return None
    q, s, depth = qa
    return Sample("extractive", ctx, _user(q), s, evidence=s, source=name, meta={"depth": round(depth, 3)})


def contract_context(rng: Random, corpus: Corpus, tk: Tokens, ctx_tokens: int, weights=None):
    """A generated agreement (possibly bundled with others, possibly with a real-text annex) of about
    ``ctx_tokens`` tokens. Returns (context, contract, qualifier) or None."""
    c = generate_contract(rng, n_extra=rng.randint(0, 4))
    qualifier = ""
    parts = [c.text]
    used = tk.count(c.text)
    if used > 1.6 * ctx_tokens:  # short contexts: accept a somewhat longer agreement (pack checks max_ctx)
        return None
    if ctx_tokens - used > 1500 and rng.random() < 0.35:
        # bundle: other agreements act as distractors; questions name the agreement
        others = []
        while used < ctx_tokens * 0.8 and len(others) < 4:
            o = generate_contract(rng)
            t = tk.count(o.text)
            if used + t > ctx_tokens:
                break
            others.append(o.text)
            used += t
        if others:
            parts = others + [c.text]
            rng.shuffle(parts)
            qualifier = f"In the {c.title.title()} between {c.parties[0].name} and {c.parties[1].name}, "
    sep = "\n\n" + "=" * 40 + "\n\n"
    text = sep.join(parts)
    room = ctx_tokens - tk.count(text) - 16
    if room > 200:
        got = real_text(rng, corpus, tk, room, weights)
        if got is not None:
            annex, _ = got
            label = rng.choice(["ANNEX A - TECHNICAL DOCUMENTATION", "SCHEDULE 3 - SYSTEM DOCUMENTATION",
                                "APPENDIX - REFERENCE MATERIAL"])
            if rng.random() < 0.7:
                text = text + "\n\n" + label + "\n\n" + annex
            else:
                text = "BACKGROUND MATERIAL\n\n" + annex + sep + text
    return text, c, qualifier


def _lower_first(q: str) -> str:
    return q[0].lower() + q[1:] if q[:2] not in ("I ",) else q


def pick_facts(rng: Random, facts: list, k: int = 1) -> list:
    """Draw ``k`` distinct facts, balancing kinds: value facts (dates, amounts, periods, parties, law)
    70 %, "which clause deals with X" 15 %, "what does clause n.m say" 15 % (an agreement has ~10
    clause-number facts, so a uniform draw would be dominated by them)."""
    pools = {"value": [f for f in facts if not f.key.startswith(("clause_of_", "quote_"))],
             "clause": [f for f in facts if f.key.startswith("clause_of_")],
             "quote": [f for f in facts if f.key.startswith("quote_")]}
    weights = {"value": 0.70, "clause": 0.15, "quote": 0.15}
    out = []
    for _ in range(k):
        kinds = [x for x in pools if pools[x]]
        if not kinds:
            break
        kind = rng.choices(kinds, weights=[weights[x] for x in kinds])[0]
        f = pools[kind].pop(rng.randrange(len(pools[kind])))
        out.append(f)
    return out


def task_contract(rng: Random, corpus: Corpus, tk: Tokens, ctx_tokens: int, weights=None) -> Sample | None:
    got = contract_context(rng, corpus, tk, ctx_tokens, weights)
    if got is None:
        return None
    ctx, c, qual = got
    facts = [f for f in c.facts if ctx.count(f.evidence) >= 1]
    if qual:
        # only facts whose evidence is unique across the bundle
        facts = [f for f in facts if ctx.count(f.evidence) == 1]
    if not facts:
        return None
    f = pick_facts(rng, facts)[0]
    q = (qual + _lower_first(f.question)) if qual else f.question
    return Sample("contract", ctx, _user(q), f.answer, evidence=f.evidence, source=f"contract/{c.kind}",
                  meta={"fact": f.key, "bundle": bool(qual), "depth": round(ctx.find(f.evidence) / len(ctx), 3)})


_SYSTEM_VARIANTS = [
    "You are a careful assistant. Answer questions about the attached document using only its content.",
    "You answer questions about the user's document. Be brief and quote the document where possible.",
]


def task_chat(rng: Random, corpus: Corpus, tk: Tokens, ctx_tokens: int, weights=None) -> Sample | None:
    turns: list[tuple[str, str, str]] = []  # (question, answer, evidence)
    if rng.random() < 0.6:
        got = contract_context(rng, corpus, tk, ctx_tokens, weights)
        if got is None:
            return None
        ctx, c, qual = got
        facts = [f for f in c.facts if ctx.count(f.evidence) == 1]
        for i, f in enumerate(pick_facts(rng, facts, rng.randint(2, 4))):
            q = (qual + _lower_first(f.question)) if (qual and i == 0) else f.question
            turns.append((q, f.answer, f.evidence))
        source = f"contract/{c.kind}"
        if c.absent_topics and turns and rng.random() < 0.25:
            topic = rng.choice(c.absent_topics)
            turns.append((f"Does the agreement contain a clause on {topic}?",
                          f"No. The agreement does not contain a clause on {topic}.", None))
    else:
        got = real_text(rng, corpus, tk, ctx_tokens, weights)
        if got is None:
            return None
        ctx, source = got
        seen = set()
        sents = sentences(ctx)
        for _ in range(rng.randint(2, 4)):
            qa = _extractive_qa(rng, ctx)
            if qa is None or qa[1] in seen:
                continue
            seen.add(qa[1])
            turns.append((qa[0], qa[1], qa[1]))
            if rng.random() < 0.3:  # follow-up that needs the position of the previous answer
                end = ctx.find(qa[1]) + len(qa[1])
                nxt = [t for o, t in sents if end < o <= end + 2]
                if nxt and nxt[0] not in seen:
                    seen.add(nxt[0])
                    turns.append((rng.choice(["What is the next sentence after that one?",
                                              "And the sentence right after it?",
                                              "Quote the sentence that follows it."]), nxt[0], nxt[0]))
        c = None
    if len(turns) < 2:
        return None
    msgs: list[dict] = []
    if rng.random() < 0.5:
        msgs.append({"role": "system", "content": rng.choice(_SYSTEM_VARIANTS)})
    for q, a, _e in turns[:-1]:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    q, a, e = turns[-1]
    msgs.append({"role": "user", "content": q})
    return Sample("chat", ctx, msgs, a, evidence=e, source=source, meta={"turns": len(turns)})


GENERATORS: dict[str, Callable[..., Sample | None]] = {
    "lm": task_lm, "passkey": task_passkey, "needle": task_needle, "kv": task_kv, "quote": task_quote,
    "extractive": task_extractive, "contract": task_contract, "chat": task_chat,
}
