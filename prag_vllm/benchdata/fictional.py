"""A fictional-knowledge QA benchmark: invented towns, people, organisations and works.

:func:`generate` invents a small world with ``random.Random(seed)`` and describes each entity
in one short English document (2-4 sentences) whose facts link it to others (a work names its
creator, a person their birth town and organisation, an organisation its founder and town).
Single-hop questions are answered by one document; two-hop ones by the document of a bridge
entity named in the first (never by the first alone). :func:`write` stores ``corpus.jsonl``,
``questions.jsonl`` and ``meta.json`` in a new directory, atomically.

Different seeds never share a name: every invented word carries its seed in a checksum
(:func:`word_class`: a hash of all but the last syllable plus the last syllable's index,
modulo :data:`SEED_CLASSES`; the last syllable is picked to match) and splits into syllables
one way only. A blocklist keeps out real names the syllable tables can spell (Paris, Homer).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace as _E

from prag_vllm.errors import InputError

GENERATOR = "prag_vllm.benchdata.fictional"
VERSION = "1"
MIN_DOCS = 4  # one town, person, organisation and work: the smallest linked world
MAX_DOCS = 20_000
SEED_CLASSES = 1000  # seeds 0..999, each with its own disjoint set of words

ONSETS = ("b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
          "br", "dr", "gr", "kr", "sk", "st", "tr", "th", "sh")
_ONSET_WEIGHTS = (4,) * 15 + (1,) * 9
VOWELS = ("a", "e", "i", "o", "u", "ai", "ei", "au")
_VOWEL_WEIGHTS = (8, 7, 6, 6, 3, 1, 1, 1)
# a word's last syllable: simple onset and vowel, optional coda (720 of them)
_FINALS = [(o, v, c) for o in ONSETS[:15] + ("dr", "tr", "th") for v in VOWELS[:5]
           for c in ("", "n", "r", "l", "s", "k", "m", "th")]
_FINAL_INDEX = {f: i for i, f in enumerate(_FINALS)}
_RUNS = re.compile(r"[aeiou]+|[^aeiou]+")

BLOCKED = frozenset("""
abel ada adam adidas aida aiden aisha akira ali amazon amir amira anita ares athena baker baku banana bari basel begin
benin biden boris bremen brutus busan dakar dali damage dana dara dave denis dimitri dina dolores domino dora dubai
eden edison elena eros ethan eva fatima federer frida gabon galina garage gaza geneva gina hades haiti hana hanuman
harare havana heine helen helena hera hiro hiroshi homer hotel humor igor iran irena irina isabel isis ivan kabul kali
karate karel karen karim karima kasimir kate kazan kemal kevin kimono kira kobe kodak kronos lada lagos lahore laila
lara larisa lauda lazarus lego leiden lemon lena lenin lesotho lima lisa liver logan loki lotus lukas lunar lusaka
malaga mali manila mara marek mason medina medusa melon metal midas mike mila milan minos misha modena mona monika
monitor moses moshe mosul motel nadal napoli nara naruto natasha nepal nero never niger nikolai nikon nina nobel nora
obama odin oman omar osaka osama panama paper paris pavel pele peres peru petal pete peter pilate pisa polar potato
prada puma putin rabin radar raisa rama ravana raven riga rimini rita river robin roman rome ronan rosa rose ruben
rumor sakura saladin salome samara samir samira samos sara sasha sega selene selim senator seven sheba shiva simon
sita skoda sofa solar solomon stalin stefan steve subaru sudan sugar suleiman susan sushi suzuki takeshi tamara tara
tarik teresa thebes tiger timur tina tirana tito titus togo toledo tomas tomato torino total tula tunis uber uranus
vadim venus vera verona veronika visitor zara zidane
""".split())  # noqa: SIM905 -- real names the syllables can spell

_PROFESSIONS = ("glassblower", "merchant", "botanist", "shipbuilder", "physician", "cartographer",
                "clockmaker", "schoolteacher", "brewer", "lawyer", "beekeeper", "printer")
# kind -> professions, verb, "by" phrase, creator phrase ({ref}/{name}), event, qualities, quality question,
# earliest birth year of a creator, placed in a town, title patterns, document text, optional sentences
_WORKS = {
    "novel": (("novelist",), "wrote", "written by", "the author of {ref}", "first published",
              ("crime", "historical", "seafaring", "comic", "gothic"), "What genre is {ref}?", 0, False,
              ("The {W} Letters", "The House of {W}", "{W}'s Winter", "The Last Summer in {W}", "The {W} Inheritance",
               "A Ferry to {W}"),
              "{T} is {a_q} novel by {C}. It was first published in {Y}.",
              ("It follows a ferry pilot through one hard winter.", "The story is told in letters.")),
    "album": (("singer", "cellist", "pianist", "fiddler"), "recorded", "recorded by", "the musician who recorded {ref}",
              "released", ("folk", "jazz", "blues", "choral"), "Which musical genre is {ref}?", 1915, False,
              ("{W} Nights", "Songs from {W}", "The {W} Sessions", "Blue {W}", "{W} Road", "Lanterns over {W}"),
              "{T} is {a_q} album by {C}. It was released in {Y}.",
              ("It contains eleven songs.", "It was recorded in a single week.")),
    "painting": (("painter",), "painted", "by", "the artist who painted {name}", "first exhibited",
                 ("oil", "watercolour", "tempera", "gouache"), "What medium was used for {ref}?", 0, False,
                 ("Portrait of {W}", "{W} at Dusk", "The {W} Orchard", "Morning in {W}", "The {W} Lighthouse",
                  "Fishermen of {W}"),
                 "{T} is {a_q} painting by {C}. It was first exhibited in {Y}.",
                 ("It shows a harbour under low cloud.", "It hangs in a private collection.")),
    "bridge": (("engineer", "architect"), "designed", "designed by", "the designer of {ref}", "opened",
               ("stone", "iron", "timber", "brick"), "What material is {ref} made of?", 0, True,
               ("{W} Bridge",), "The {T} is {a_q} bridge in {P}, designed by {C}. It opened in {Y}.",
               ("It has five arches.", "It carries both road and rail traffic.")),
    "statue": (("sculptor",), "sculpted", "by", "the sculptor of {ref}", "unveiled",
               ("bronze", "marble", "granite", "limestone"), "What material is {ref} made of?", 0, True,
               ("{W} Rising", "Heron of {W}", "Dancer of {W}", "The Ferryman of {W}", "The {W} Horse"),
               "{T} is {a_q} statue by {C} in {P}. It was unveiled in {Y}.",
               ("It stands about four metres tall.", "It was paid for by public subscription.")),
}
_ORGS = (("shipping company", "{W} Shipping Company", "It runs cargo ferries along the coast."),
         ("choir", "{W} Choir", "It sings mostly sacred music."),
         ("botanical society", "{W} Botanical Society", "It keeps a walled garden of rare ferns."),
         ("publishing house", "{W} Press", "It publishes poetry and travel books."),
         ("rowing club", "{W} Rowing Club", "Its crews race every spring."),
         ("observatory", "{W} Observatory", "Its telescope is open to visitors on clear nights."),
         ("bank", "Bank of {W}", "It lends mostly to farmers and fishermen."),
         ("weaving cooperative", "{W} Weavers' Cooperative", "Its members sell linen at the weekly market."))
_TOWN_EXTRAS = ("It is known for its salt marshes.", "It is known for its old clock tower.",
                "It holds a lantern festival every autumn.", "It is known for its glass workshops.")


@dataclass
class FictionalSet:
    """A generated benchmark: corpus rows, question rows and what made them."""

    documents: list[dict]
    questions: list[dict]
    seed: int = 0
    words: list[str] = field(default_factory=list)
    """The invented words in the documents (all of the seed's :func:`word_class`)."""
    meta: dict = field(default_factory=dict)


def _prefix_hash(prefix: str) -> int:
    return int.from_bytes(hashlib.blake2b(prefix.encode(), digest_size=8).digest(), "big") % SEED_CLASSES


def word_class(word: str) -> int:
    """The seed class of an invented word (the seed, for seeds below :data:`SEED_CLASSES`)."""
    runs = _RUNS.findall(word.lower())
    coda = runs.pop() if runs[-1][0] not in "aeiou" else ""
    vowel, onset = runs.pop(), runs.pop()
    return (_prefix_hash("".join(runs)) + _FINAL_INDEX[(onset, vowel, coda)]) % SEED_CLASSES


class _Namer:
    """Unique invented words of one seed class."""

    def __init__(self, rng: random.Random, seed: int):
        self.rng, self.cls, self.used = rng, seed % SEED_CLASSES, {}  # word -> None, in order

    def word(self) -> str:
        rng = self.rng
        for attempt in range(4000):
            n = rng.choices((2, 3, 4), (55, 42, 3))[0] + attempt // 1000
            prefix = "" if rng.random() < 0.15 else rng.choices(ONSETS, _ONSET_WEIGHTS)[0]
            for i in range(n - 1):
                onset = rng.choices(ONSETS, _ONSET_WEIGHTS)[0] if i else ""
                prefix += onset + rng.choices(VOWELS, _VOWEL_WEIGHTS)[0]
            last = (self.cls - _prefix_hash(prefix)) % SEED_CLASSES  # the one last syllable that fits the seed
            if last >= len(_FINALS):
                continue
            word = (prefix + "".join(_FINALS[last])).capitalize()
            if len(word) >= 4 and word not in self.used and word.lower() not in BLOCKED:
                self.used[word] = None
                return word
        raise RuntimeError("fictional: ran out of invented names")  # not reached below MAX_DOCS


def _a(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower().replace("'", "")).strip("-")


def _counts(n: int) -> tuple[int, int, int, int]:
    """(towns, organisations, works, people) for ``n`` documents; everyone makes at most one work."""
    towns, orgs, works = max(1, round(n * 0.2)), max(1, round(n * 0.2)), max(1, round(n * 0.25))
    while n - towns - orgs - works < max(orgs, works):
        works -= 1
    return towns, orgs, works, n - towns - orgs - works


def _world(n: int, rng: random.Random, namer: _Namer) -> tuple[list, list, list, list]:
    n_town, n_org, n_work, n_person = _counts(n)
    regions = [namer.word() for _ in range(max(1, round(n_town / 3)))]
    rivers = [namer.word() for _ in range(max(1, round(n_town * 0.6)))]
    towns = []
    for _ in range(n_town):
        pop = int(round(10 ** rng.uniform(3.2, 5.7), -2))
        towns.append(_E(kind="town", name=namer.word(), region=rng.choice(regions), river=rng.choice(rivers),
                        founded=rng.randint(1050, 1790), population=pop, type="city" if pop >= 100_000 else "town"))
    first = [namer.word() for _ in range(max(4, 2 * n_person))]  # drawn with replacement: a few repeat
    people = []
    for _ in range(n_person):
        b = rng.randrange(n_town)
        s = rng.randrange(n_town - 1) if n_town > 1 and rng.random() < 0.6 else None
        people.append(_E(kind="person", name=f"{rng.choice(first)} {namer.word()}", born=rng.randint(1820, 1975),
                         birth_town=towns[b], settled=None if s is None else towns[s + (s >= b)],
                         pron=rng.choice((("she", "her"), ("he", "his"))), profession=None, work=None, org=None,
                         member=None))
    works = []
    for p in rng.sample(people, n_work):
        kind = rng.choice([k for k, spec in _WORKS.items() if p.born >= spec[7]])
        spec = _WORKS[kind]
        p.profession = rng.choice(spec[0])
        p.work = _E(kind="work", type=kind, name=rng.choice(spec[9]).format(W=namer.word()), creator=p,
                    year=min(p.born + rng.randint(24, 60), 2021), quality=rng.choice(spec[5]),
                    town=rng.choice(towns) if spec[8] else None, spec=spec)
        works.append(p.work)
    orgs = []
    kinds = rng.sample(_ORGS, len(_ORGS))  # cycled, so that every kind of organisation turns up
    for i, p in enumerate(rng.sample(people, n_org)):
        otype, pattern, extra = kinds[i % len(kinds)]
        p.org = _E(kind="organisation", type=otype, name=pattern.format(W=namer.word()), founder=p,
                   city=rng.choice(towns), founded=min(p.born + rng.randint(25, 55), 2019), extra=extra)
        orgs.append(p.org)
    for p in people:
        p.profession = p.profession or rng.choice(_PROFESSIONS)
        if p.work is None and p.org is None:
            p.member = rng.choice(orgs)
    return towns, people, orgs, works


def _wref(w) -> str:
    return f"the {w.name}" if w.type == "bridge" else f"the {w.type} {w.name}"


def _text(e, rng: random.Random) -> str:
    if e.kind == "town":
        s = [rng.choice((f"{e.name} is {_a(e.type)} in the {e.region} region, on the river {e.river}.",
                         f"{e.name} is {_a(e.type)} on the river {e.river}, in the {e.region} region.")),
             rng.choice((f"It was founded in {e.founded}.", f"{e.name} was founded in {e.founded}.")),
             rng.choice((f"Today it has about {e.population:,} inhabitants.",
                         f"About {e.population:,} people live there."))]
        return " ".join(s + ([rng.choice(_TOWN_EXTRAS)] if rng.random() < 0.5 else []))
    if e.kind == "person":
        alive, (he, his) = e.born >= 1930, e.pron
        cap_he, cap_his = he.capitalize(), his.capitalize()
        be, b, prof = "is" if alive else "was", e.birth_town.name, _a(e.profession)
        s = [rng.choice((f"{e.name} (born {e.born} in {b}) {be} {prof}.",
                         f"{e.name} {be} {prof} who was born in {b} in {e.born}.",
                         f"{e.name} was born in {b} in {e.born} and {'works' if alive else 'worked'} as {prof}."))]
        if e.settled:
            life = f", where {he} spent most of {his} working life" if rng.random() < 0.5 else ""
            s.append(f"{cap_he} later settled in {e.settled.name}{life}.")
        if e.work:
            s.append(rng.choice((f"{cap_his} best-known work is {_wref(e.work)}.",
                                 f"{cap_he} is best remembered for {_wref(e.work)}.")))
        if e.org:
            found = "went on to found" if rng.random() < 0.5 else "founded"
            s.append(f"{cap_he} {found} the {e.org.name}.")
        if e.member:
            many = " for many years" if rng.random() < 0.5 else ""
            s.append(f"{cap_he} was{many} a member of the {e.member.name}.")
        return " ".join(s)
    if e.kind == "organisation":
        s = [rng.choice((f"The {e.name} is {_a(e.type)} based in {e.city.name}.",
                         f"The {e.name} is {_a(e.type)} with its seat in {e.city.name}.")),
             rng.choice((f"It was founded in {e.founded} by {e.founder.name}.",
                         f"{e.founder.name} founded it in {e.founded}."))]
        return " ".join(s + ([e.extra] if rng.random() < 0.5 else []))
    text = e.spec[10].format(T=e.name, a_q=_a(e.quality), C=e.creator.name, Y=e.year, P=e.town and e.town.name)
    return text + (" " + rng.choice(e.spec[11]) if rng.random() < 0.5 else "")


def _candidates(towns: list, people: list, orgs: list, works: list) -> tuple[list, list]:
    """All (single-hop, two-hop) questions the world supports, one per (entity, attribute path)."""
    single, two = [], []

    def ask(subject, key, question, answer, *via):
        answer = str(answer)
        if via and answer in subject.text:  # answerable from the first document alone
            return
        (two if via else single).append({"subject": subject.id, "key": key, "question": question,
                                         "answers": [answer], "docs": [subject.id] + [v.id for v in via]})

    def town_hop(subject, key, t, where):
        ask(subject, key + ".region", f"In which region is the {t.type} {where}?", t.region, t)
        ask(subject, key + ".river", f"On which river is the {t.type} {where}?", t.river, t)
        ask(subject, key + ".founded", f"In which year was the {t.type} {where} founded?", t.founded, t)

    def person_hop(subject, key, p, role):
        ask(subject, key + ".birth_town", f"In which {p.birth_town.type} was {role} born?", p.birth_town.name, p)
        ask(subject, key + ".born", f"In which year was {role} born?", p.born, p)

    for t in towns:
        ask(t, "region", f"In which region is {t.name}?", t.region)
        ask(t, "river", f"On which river is {t.name}?", t.river)
        ask(t, "founded", f"In which year was {t.name} founded?", t.founded)
    for p in people:
        n, be = p.name, "is" if p.born >= 1930 else "was"
        ask(p, "birth_town", f"In which {p.birth_town.type} was {n} born?", p.birth_town.name)
        ask(p, "born", f"In which year was {n} born?", p.born)
        ask(p, "profession", f"What {be} {n}'s profession?", p.profession)
        town_hop(p, "birth_town", p.birth_town, f"where {n} was born")
        if p.settled:
            ask(p, "settled", f"In which {p.settled.type} did {n} later settle?", p.settled.name)
        if p.work:
            w = p.work
            by = f"the {w.type} {w.spec[2]} {n}"
            ask(p, "work", f"What is the {'name' if w.type == 'bridge' else 'title'} of {by}?", w.name)
            ask(p, "work.year", f"In which year was {by} {w.spec[4]}?", w.year, w)
            ask(p, "work.quality", w.spec[6].format(ref=by), w.quality, w)
            if w.town:
                ask(p, "work.town", f"In which {w.town.type} does {by} stand?", w.town.name, w)
        if p.org:
            o = p.org
            ask(p, "org", f"Which organisation did {n} found?", o.name)
            ask(p, "org.city", f"In which {o.city.type} is the {o.type} founded by {n} based?", o.city.name, o)
            ask(p, "org.founded", f"In which year was the {o.type} founded by {n} established?", o.founded, o)
        if p.member:
            ask(p, "member", f"Which organisation was {n} a member of?", p.member.name)
    for o in orgs:
        f = o.founder
        ask(o, "founder", f"Who founded the {o.name}?", f.name)
        ask(o, "city", f"In which {o.city.type} is the {o.name} based?", o.city.name)
        ask(o, "founded", f"In which year was the {o.name} founded?", o.founded)
        person_hop(o, "founder", f, f"the founder of the {o.name}")
        ask(o, "founder.profession", f"What {'is' if f.born >= 1930 else 'was'} the profession of the founder of "
            f"the {o.name}?", f.profession, f)
        town_hop(o, "city", o.city, f"where the {o.name} is based")
    for w in works:
        ref = _wref(w)
        ask(w, "creator", f"Who {w.spec[1]} {w.name if w.type == 'painting' else ref}?", w.creator.name)
        ask(w, "year", f"In which year was {ref} {w.spec[4]}?", w.year)
        ask(w, "quality", w.spec[6].format(ref=ref), w.quality)
        person_hop(w, "creator", w.creator, w.spec[3].format(ref=ref, name=w.name))
        if w.town:
            ask(w, "town", f"In which {w.town.type} does {ref} stand?", w.town.name)
            town_hop(w, "town", w.town, f"where {ref} stands")
    return single, two


def _spread(cands: list[dict], k: int, rng: random.Random) -> list[dict]:
    """``k`` candidates in random order, but each entity's first question before anyone's second."""
    rng.shuffle(cands)
    rank: dict[str, int] = {}
    keyed = []
    for i, c in enumerate(cands):
        rank[c["subject"]] = rank.get(c["subject"], -1) + 1
        keyed.append((rank[c["subject"]], i))
    return [cands[i] for _, i in sorted(keyed)[:k]]


def _bad_int(value, low: int, high: int) -> bool:
    return isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high


def check_args(n_docs: int, seed: int, n_questions: int | None = None) -> None:
    """Raise :class:`InputError` for arguments :func:`generate` cannot honour."""
    if _bad_int(n_docs, MIN_DOCS, MAX_DOCS):
        raise InputError(f"--docs must be an integer from {MIN_DOCS} (one town, person, organisation and work) "
                         f"to {MAX_DOCS}, got {n_docs!r}")
    if _bad_int(seed, 0, SEED_CLASSES - 1):
        raise InputError(f"--seed must be an integer from 0 to {SEED_CLASSES - 1} (each seed has its own disjoint "
                         f"set of names), got {seed!r}")
    if n_questions is not None and _bad_int(n_questions, 1, 10 * MAX_DOCS):
        raise InputError(f"--questions must be a positive integer, got {n_questions!r}")


def generate(n_docs: int, seed: int, n_questions: int | None = None) -> FictionalSet:
    """Invent ``n_docs`` documents and ``n_questions`` (default ``2 * n_docs``) questions, about half
    of them two-hop; the same arguments always give the same set."""
    check_args(n_docs, seed, n_questions)
    n_questions = 2 * n_docs if n_questions is None else n_questions
    rng = random.Random(seed)
    namer = _Namer(rng, seed)
    towns, people, orgs, works = _world(n_docs, rng, namer)
    entities = towns + people + orgs + works
    rng.shuffle(entities)
    for e in entities:
        e.id, e.text = _slug(e.name), _text(e, rng)
    assert len({e.id for e in entities}) == len(entities), "fictional: duplicate document id"
    single, two = _candidates(towns, people, orgs, works)
    n_two = min(len(two), n_questions // 2)
    n_single = min(len(single), n_questions - n_two)
    n_two = min(len(two), n_questions - n_single)
    if n_single + n_two < n_questions:
        raise InputError(f"--questions {n_questions} is more than the {len(single) + len(two)} distinct questions "
                         f"{n_docs} documents support; ask for fewer or add documents")
    picked = ([dict(c, type="single-hop") for c in _spread(single, n_single, rng)]
              + [dict(c, type="two-hop") for c in _spread(two, n_two, rng)])
    rng.shuffle(picked)
    text = {e.id: e.text for e in entities}
    questions = []
    for i, c in enumerate(picked, 1):
        assert all(a in text[c["docs"][-1]] for a in c["answers"]), c  # the answer is in its (last) gold document
        questions.append({"id": f"q{i:04d}", "question": c["question"], "answers": c["answers"], "type": c["type"],
                          "docs": c["docs"]})
    documents = [{"id": e.id, "title": e.name, "text": e.text} for e in entities]
    meta = {"generator": GENERATOR, "version": VERSION, "seed": seed, "n_documents": len(documents),
            "n_questions": len(questions), "documents_by_kind": {"town": len(towns), "person": len(people),
                                                                 "organisation": len(orgs), "work": len(works)},
            "questions_by_type": {"single-hop": n_single, "two-hop": n_two},
            "files": {"corpus": "corpus.jsonl", "questions": "questions.jsonl"}}
    seen = set(re.findall(r"[A-Z][a-z]+", " ".join(text.values())))
    return FictionalSet(documents, questions, seed, [w for w in namer.used if w in seen], meta)


def _check_out_dir(out: Path) -> None:
    try:
        if out.is_symlink() or out.exists():
            if not out.is_dir():
                raise InputError(f"output path exists and is not a directory: {out}")
            if any(out.iterdir()):
                raise InputError(f"output directory is not empty: {out} (give a new or empty directory)")
        base = out.absolute().parent
        while not (base.exists() or base.is_symlink()) and base != base.parent:
            base = base.parent
        if not base.is_dir():
            raise InputError(f"cannot create {out}: {base} is not a directory")
        if not os.access(base, os.W_OK | os.X_OK):
            raise InputError(f"cannot create {out}: {base} is not writable")
    except OSError as exc:
        raise InputError(f"cannot use output directory {out}: {exc.strerror or exc}") from None


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def write(fset: FictionalSet, out_dir: str | os.PathLike) -> Path:
    """Write ``corpus.jsonl``, ``questions.jsonl`` and ``meta.json`` into ``out_dir``, which must not
    exist yet or be empty; all three appear at once (a temporary directory renamed into place)."""
    from prag_vllm.fileio import atomic_directory

    out = Path(out_dir)
    _check_out_dir(out)
    files = {"corpus.jsonl": _jsonl(fset.documents), "questions.jsonl": _jsonl(fset.questions),
             "meta.json": (json.dumps(fset.meta, indent=2, ensure_ascii=False) + "\n").encode("utf-8")}
    try:
        with atomic_directory(out) as tmp:
            for name, data in files.items():
                (tmp / name).write_bytes(data)
            tmp.chmod(0o755)
    except OSError as exc:
        raise InputError(f"cannot write {out}: {exc.strerror or exc}") from None
    return out
