"""Math answer extraction and comparison on hand-made edge cases."""

import pytest

from sclora.experiments.evaluate.math_answers import extract_math_answer, math_equal, normalize_number


@pytest.mark.parametrize(
    "text,expected",
    [
        ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72"),
        ("... so she has 1,234 dollars left.\n#### 1,234", "1234"),
        ("The answer is: 1,234.", "1234"),
        ("The answer is: -5", "-5"),
        ("The final answer is $18.50.", "18.5"),
        ("so the answer is 3.0", "3"),
        ("He pays $12 per hour, so 12 * 3 = 36 dollars in total.", "36"),
        ("First 2 + 3 = 5. The answer is: 45%", "45"),
        ("#### 10\nThe answer is: 11", "10"),  # the reference marker wins over a later phrase
        ("Therefore \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{1,000}", "1000"),
        ("The answer is: x = 4", "x = 4"),
        ("no numbers here", None),
        ("", None),
        ("Temperatures fell to -12 overnight and rose by .5 degrees", "0.5"),
    ],
)
def test_extract_math_answer(text, expected):
    assert extract_math_answer(text) == expected


@pytest.mark.parametrize(
    "text,expected",
    [("1,234.50", "1234.5"), ("-3.0", "-3"), ("$12", "12"), ("45%", "45"), ("7.", "7"), ("12 dollars", "12"),
     ("abc", None), ("nan", None), ("1e400", None)],
)
def test_normalize_number(text, expected):
    assert normalize_number(text) == expected


def test_math_equal_numeric_and_symbolic():
    assert math_equal("1234", "1,234")
    assert math_equal("0.5", "0.50")
    assert not math_equal("72", "73")
    assert not math_equal(None, "3")
    assert math_equal("\\frac{1}{2}", "0.5")  # math-verify: LaTeX against a number
    assert math_equal("\\frac{2}{4}", "\\frac{1}{2}")
    assert not math_equal("\\frac{1}{3}", "\\frac{1}{2}")
