"""E2E slot errors: which attribute values of the input table an output leaves out, adds or gets wrong.

The value-matching rules are those of the E2E cleaning work (Dušek, Howcroft & Rieser, INLG 2019,
"Semantic Noise Matters for Neural NLG"; ``slot_error.py`` of github.com/tuetschek/e2e-cleaning),
reimplemented here:

1. Every realisation pattern of every (attribute, value) is searched in the output, as whole words,
   case-insensitively. ``name`` and ``near`` match their values verbatim; the other attributes have
   paraphrase patterns per value (``PATTERNS``: "child-friendly", "not family-friendly", "expensive",
   "5 stars", "by the river", ...).
2. A match inside a longer match is dropped (e.g. "coffee" inside "coffee shop"). When several
   values match the very same words (e.g. "cheap" is a realisation of both ``cheap`` and ``less than
   £20``), the one the input table has is kept; otherwise the first pattern listed wins.
3. Per attribute, the values found are compared with the table's: a table value not found and a
   found value not in the table, up to the same number, are *wrong values*; the rest are *missing*
   or *added*. An attribute found but absent from the table is *added*, one in the table but not
   found *missing*. The slot error rate (SER) is (added + missing + wrong + repeated) / table values.

Two deliberate differences from the script, both stated in the report: a value mentioned twice
counts once (the script intends to count repeats but, through a variable slip, only ever does so
for a repeated "low" customer rating), and outputs are lightly detokenised first (``"isn 't"`` ->
``"isn't"``): our models write the tokenised style of the Prefix-Tuning E2E files, which the
patterns (written for raw text) would otherwise partly miss. Numbers with "£" and hyphens
("£ 20 - 25", "family - friendly") are matched by the patterns as they are.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# attribute -> value -> patterns (regular expressions, matched as whole words, case-insensitive).
# ``name`` and ``near`` are matched verbatim from their value lists.
CHILD = r"(?:child|children|family|kids|kid)"
KIDS = r"(?:kids?|child(?:ren)?|famil(?:y|ies))"
RATED = r"(?:rat(?:ings?|e[ds]?)|reviews?|standards?|quality)"
RATED_AFTER = r"(?:rat(?:ings?|ed)|reviews?|standards?|quality)"
PRICES = r"prices?(?: range)?(?: \w+){0,3}"


def _stars(n: str) -> list[str]:
    return [rf"(?:{n})[- ]+stars?", rf"(?:{n})(?: out)? of (?:5|five)"]


PATTERNS: dict[str, dict[str, list[str]]] = {
    "area": {
        "city centre": [r"(?:city|town) cent(?:re|er)", r"cent(?:re|er) of (?:the )?(?:city|town)", r"in the cent(?:re|er)"],
        "riverside": [r"riverside", r"(?:near|by|at|close to|along|on|off|beside) the river"],
    },
    "eat_type": {
        "coffee shop": [r"coffee[- ]+shop", r"caf[eé]", r"coffee"],
        "pub": [r"pub"],
        "restaurant": [r"restaurant"],
    },
    "family_friendly": {
        "no": [
            rf"(?:isn't|not|non|no)[ -]+(?:\w+ ){{0,2}}{CHILD}[ -]+(?:friendly|orien(?:ta)?ted)",
            rf"{CHILD}[ -]+unfriendly",
            r"adults?[ -]+only",
            r"only for adults",
            r"(?:no|not) (?:kids|children|famil(?:y|ies))",
            r"(?:not|no)(?: good| suitable| friendly| orien(?:ta)?ted| open(?:ed))? (?:at|for|to|with)(?: the)? "
            r"(?:kids|children|family|families|all age)",
            rf"{KIDS} (?:are|is)(?:n't| not) (?:welcome|allowed|accepted)",
            rf"(?:does not|doesn't) (?:welcome|allow|accept) (?:\w+ ){{0,2}}(?:{KIDS}|all age)",
            r"adult (?:establishment|venue|place|establish)",
        ],
        "yes": [
            r"for (?:kids|children|family|families)",
            r"family place",
            r"place to bring the(?: whole)? family",
            # (as in the original rules: " the" is required and directly followed by the noun, so this
            # one cannot match; kept so that the rates stay comparable with the literature)
            r"(?:friendly|suitable|good|orien(?:ta)?ted|open(?:ed)) (?:at|with|to|for)(?: the)(?:kids?|child(?:ren)?|famil(?:y|ies)?|all age)",
            rf"{CHILD}[ -]+(?:friendly|orien(?:ta)?ted)",
            rf"{KIDS} (?:are|is) (?:welcome|allowed|accepted)",
            rf"(?:welcomes?|allows?|accepts?) (?:\w+ ){{0,2}}(?:{KIDS}|all age)",
        ],
    },
    "food": {"Chinese": ["Chinese", "Chines"], "English": ["English", "British"], "Fast food": ["Fast food"],
             "French": ["French"], "Indian": ["Indian"], "Italian": ["Italian"], "Japanese": ["Japanese"]},
    "price_range": {
        "cheap": [r"(?:inexpensive|cheap)(?:ly)?", r"low[- ]+price[ds]?", r"affordabl[ey]", rf"{PRICES} low"],
        "less than £20": [r"(?:inexpensive|cheap)(?:ly)?", r"affordabl[ey]", r"(?:less than|under) £? *20",
                          r"moderately priced", r"low[- ]+price[ds]?", rf"{PRICES} low"],
        "more than £30": [r"(?:more than|over) £? *30", r"high[- ]+price[ds]?", r"expensive", r"not cheap", rf"{PRICES} high"],
        "high": [r"high[- ]+price[ds]?", r"expensive", rf"{PRICES} high"],
        "moderate": [r"(?:moderate|reasonable|ok|average)(?:ly)?[- ]+price[ds]?", r"not cheap", r"affordable",
                     r"mid[- ]+(?:range[- ]+)price[ds]?", rf"{PRICES} (?:ok|average|moderate|reasonable)"],
        "£20-25": [r"£? *20 *(?:[-–]*|to) *25", r"(?:moderate|reasonable|ok|average)(?:ly)?[- ]+price[ds]?",
                   rf"{PRICES} (?:ok|average|moderate|reasonable)", r"affordable"],
    },
    "rating": {
        "1 out of 5": _stars("1|one") + [rf"{RATED}(?: \w+){{0,2}} (?:as )?(?:low|bad|poor)",
                                         rf"(?:low|bad|poor)(?:ly)?(?:[ -]+\w+){{0,2}}[ -]+{RATED_AFTER}"],
        "3 out of 5": _stars("3|three") + [rf"{RATED}(?: \w+){{0,2}} (?:as )?average",
                                           rf"average(?:ly)?(?:[ -]+\w+){{0,2}}[ -]+{RATED_AFTER}"],
        "5 out of 5": _stars("5|five") + [rf"{RATED}(?: \w+){{0,2}} (?:as )?high",
                                          rf"(?:high|excellent|very good|great)(?:ly)?(?:[ -]+\w+){{0,2}}[ -]+{RATED_AFTER}"],
        "high": _stars("5|five") + [rf"{RATED}(?: \w+){{0,2}} (?:as )?high",
                                    rf"(?:high|excellent|very good|great|well)(?:ly)?(?:[ -]+\w+){{0,2}}[ -]+{RATED_AFTER}"],
        "average": _stars("3|three") + [rf"{RATED}(?: \w+){{0,2}} (?:as )?average",
                                        rf"(?:average|(?<!very )(?:good|well))(?:ly)?(?:[ -]+\w+){{0,2}}[ -]+{RATED_AFTER}"],
        "low": _stars("1|one") + [rf"{RATED}(?: \w+){{0,2}} (?:as )?(?:low|bad|poor)",
                                  rf"(?:low|bad|poor|does ?n['o]t have good|(?:is)?n['o]t (?:well|good))(?:ly)?(?:[ -]+\w+){{0,2}}[ -]+{RATED_AFTER}"],
    },
}
NAMES = ("Alimentum", "Aromi", "Bibimbap House", "Blue Spice", "Browns Cambridge", "Clowns", "Cocum", "Cotto",
         "Fitzbillies", "Giraffe", "Green Man", "Loch Fyne", "Midsummer House", "Strada", "Taste of Cambridge",
         "The Cambridge Blue", "The Cricketers", "The Dumpling Tree", "The Eagle", "The Golden Curry",
         "The Golden Palace", "The Mill", "The Olive Grove", "The Phoenix", "The Plough", "The Punter", "The Rice Boat",
         "The Twenty Two", "The Vaults", "The Waterman", "The Wrestlers", "Travellers Rest Beefeater", "Wildwood", "Zizzi")
NEAR = ("All Bar One", "Avalon", "Burger King", "Café Adriatic", "Café Brazil", "Café Rouge", "Café Sicilia",
        "Clare Hall", "Crowne Plaza Hotel", "Express by Holiday Inn", "Rainbow Vegetarian Café", "Raja Indian Cuisine",
        "Ranch", "The Bakers", "The Portland Arms", "The Rice Boat", "The Six Bells", "The Sorrento", "Yippee Noodle Bar")
# the order in which attributes are searched (it decides ties between equal matches, see rule 2)
ORDER = ("area", "eat_type", "family_friendly", "food", "name", "near", "price_range", "rating")

# attribute names of the two MR formats -> ours
KEYS = {"name": "name", "type": "eat_type", "eattype": "eat_type", "eat_type": "eat_type", "price": "price_range",
        "pricerange": "price_range", "price_range": "price_range", "customer rating": "rating", "rating": "rating",
        "customerrating": "rating", "near": "near", "food": "food", "area": "area", "family friendly": "family_friendly",
        "familyfriendly": "family_friendly", "family_friendly": "family_friendly"}


def _whole_words(patterns: Sequence[str]) -> re.Pattern:
    return re.compile("|".join(rf"\b{p}\b" for p in patterns), re.I | re.UNICODE)


def _compile() -> list[tuple[str, str, re.Pattern]]:
    """(attribute, value, one regex for all the value's patterns), in search order."""
    out = []
    for attr in ORDER:
        if attr in ("name", "near"):
            out += [(attr, v, _whole_words([re.escape(v)])) for v in (NAMES if attr == "name" else NEAR)]
        else:
            out += [(attr, v, _whole_words(ps)) for v, ps in PATTERNS[attr].items()]
    return out


SEARCH = _compile()


def _squash(value: str) -> str:
    """A value compared without case and spaces ("less than £ 20" = "less than £20")."""
    return re.sub(r"\s+", "", value.lower())


CANONICAL = {attr: {_squash(v): v for v in (NAMES if attr == "name" else NEAR if attr == "near" else PATTERNS[attr])}
             for attr in ORDER}


def parse_mr(mr: str) -> dict[str, str]:
    """The table of an E2E input, {attribute: canonical value}: our linearisation
    (``name : The Eagle | Type : coffee shop | price : less than £ 20``) or the dataset's
    (``name[The Eagle], eatType[coffee shop], priceRange[less than £20]``). Raises ValueError on an
    attribute or value the E2E data does not have."""
    pairs = re.findall(r"([A-Za-z_ ]+)\[([^\]]*)\]", mr) if "[" in mr else [p.split(" : ", 1) for p in mr.split(" | ")]
    table = {}
    for pair in pairs:
        if len(pair) != 2:
            raise ValueError(f"not an E2E table: {mr!r} (expected 'attribute : value' parts joined by ' | ')")
        key, value = pair[0].strip().lower(), pair[1].strip()
        if key.replace(",", "").strip() not in KEYS:
            raise ValueError(f"unknown E2E attribute {pair[0]!r} in {mr!r}")
        attr = KEYS[key.replace(",", "").strip()]
        canonical = CANONICAL[attr].get(_squash(value))
        if canonical is None:
            raise ValueError(f"unknown value {value!r} of E2E attribute {attr!r} in {mr!r}")
        table[attr] = canonical
    return table


def detokenise(text: str) -> str:
    """Undo the tokenisation of contractions that the patterns need whole ("isn 't" -> "isn't")."""
    return re.sub(r"(\w) (n?['’]\w)", r"\1\2", text)


def values_found(text: str, table: dict[str, str] | None = None) -> dict[str, set[str]]:
    """{attribute: values} that ``text`` realises (rules 1 and 2 of the module doc); ``table`` breaks ties."""
    table = table or {}
    text = detokenise(text)
    matches = [(attr, value, m.start(), m.end()) for attr, value, regex in SEARCH for m in regex.finditer(text)]
    kept: list[tuple] = []
    for i, (attr, value, s, e) in enumerate(matches):
        drop = False
        for j, (attr2, value2, s2, e2) in enumerate(matches):
            if i == j:
                continue
            inside = (s > s2 and e <= e2) or (s >= s2 and e < e2)
            same = s == s2 and e == e2
            if inside or (same and (table.get(attr2) == value2 or (attr2, value2, s2, e2) in kept)):
                drop = True
                break
        if not drop:
            kept.append((attr, value, s, e))
    found: dict[str, set[str]] = {}
    for attr, value, _, _ in kept:
        found.setdefault(attr, set()).add(value)
    return found


def errors(text: str, table: dict[str, str]) -> dict[str, int]:
    """Slot errors of one output against its table (rule 3): added, missing, wrong, repeated, slots."""
    found = values_found(text, table)
    added = missing = wrong = 0
    for attr in set(table) | set(found):
        want = {table[attr]} if attr in table else set()
        got = found.get(attr, set())
        not_found, not_wanted = len(want - got), len(got - want)
        wrong += min(not_found, not_wanted)
        missing += max(not_found - not_wanted, 0)
        added += max(not_wanted - not_found, 0)
    # repeated: always 0 here (each value found counts once; see the module doc)
    return {"added": added, "missing": missing, "wrong": wrong, "repeated": 0, "slots": len(table)}


def score(outputs: Sequence[str], mrs: Sequence[str]) -> dict[str, float]:
    """Slot error rate (percent of table values) and its parts over a test set; ``mrs[i]`` is the
    table of ``outputs[i]`` in either format of :func:`parse_mr`. Also the percent of outputs with
    no error (``correct_outputs``)."""
    if len(outputs) != len(mrs):
        raise ValueError(f"{len(outputs)} outputs for {len(mrs)} tables")
    per = item_errors(outputs, mrs)
    slots = sum(p["slots"] for p in per)
    total = {k: sum(p[k] for p in per) for k in ("added", "missing", "wrong", "repeated")}
    return {"SER": 100 * sum(total.values()) / max(1, slots), **{k: 100 * v / max(1, slots) for k, v in total.items()},
            "correct_outputs": 100 * sum(not (p["added"] or p["missing"] or p["wrong"]) for p in per) / max(1, len(per))}


def item_errors(outputs: Sequence[str], mrs: Sequence[str]) -> list[dict[str, int]]:
    return [errors(o, parse_mr(m)) for o, m in zip(outputs, mrs)]
