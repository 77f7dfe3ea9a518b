"""Generate ListOps data with the LRA grammar, written in the release's TSV layout.

The grammar of the LRA ListOps generator (google-research/long-range-arena, ``lra_benchmarks/data/listops.py``):
an expression is a digit ``0-9`` or ``[OP e_1 ... e_n ]`` with ``OP`` one of ``MIN MAX MED SM`` (median rounded
down, sum modulo 10) and ``2 <= n <= max_args`` sub-expressions; below ``max_depth`` a sub-expression is an
operator with probability 0.25. Expressions are written as the release writes them, in the bracketed binary
tree form (``( ( ( [MAX 2 ) 9 ) ] )``), to ``basic_{train,val,test}.tsv`` with the header ``Source<TAB>Target``,
so :class:`mrconvnext.data.ListOps` reads them exactly as it reads the release.

    python -m mrconvnext.data.listops_generator OUT_DIR --train 2000 --val 300 --test 500
"""

from __future__ import annotations

import argparse
import os
import random
import statistics

from ..utils.cli import HelpFormatter

__all__ = ["generate_listops", "evaluate", "to_release_string"]

OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
OPERATOR_P = 0.25  # probability that a sub-expression above max_depth is an operator (LRA: VALUE_P = 0.25)
_APPLY = {
    "[MIN": min,
    "[MAX": max,
    "[MED": lambda values: int(statistics.median(values)),
    "[SM": lambda values: sum(values) % 10,
}

Expression = int | tuple[str, list]


def _generate(rng: random.Random, depth: int, max_depth: int, max_args: int) -> tuple[Expression, int]:
    """An expression and its token count (``[OP`` and ``]`` count one each, as in LRA)."""
    if depth > 1 and (depth >= max_depth or rng.random() > OPERATOR_P):
        return rng.randrange(10), 1
    args, length = [], 2
    for _ in range(rng.randint(2, max_args)):
        arg, arg_length = _generate(rng, depth + 1, max_depth, max_args)
        args.append(arg)
        length += arg_length
    return (rng.choice(OPERATORS), args), length


def evaluate(expression: Expression) -> int:
    if isinstance(expression, int):
        return expression
    operator, args = expression
    return _APPLY[operator]([evaluate(arg) for arg in args])


def to_release_string(expression: Expression) -> str:
    """The LRA release's bracketed binary-tree form: ``[OP a b ]`` is ``( ( ( [OP a ) b ) ] )``."""
    if isinstance(expression, int):
        return str(expression)
    operator, args = expression
    text = f"( {operator} {to_release_string(args[0])} )"
    for arg in args[1:]:
        text = f"( {text} {to_release_string(arg)} )"
    return f"( {text} ] )"


def generate_listops(
    out_dir: str,
    num_train: int = 2000,
    num_val: int = 300,
    num_test: int = 500,
    max_depth: int = 3,
    max_args: int = 5,
    max_length: int = 100,
    seed: int = 0,
) -> dict[str, str]:
    """Write distinct expressions of at most ``max_length`` tokens; returns the path of each split's TSV."""
    for name, value, minimum in (
        ("num_train", num_train, 0),
        ("num_val", num_val, 0),
        ("num_test", num_test, 0),
        ("max_depth", max_depth, 1),
        ("max_args", max_args, 2),  # an operator takes 2 to max_args arguments
        ("max_length", max_length, 1),
    ):
        if value < minimum:
            raise ValueError(f"{name} must be at least {minimum}, got {value}")
    rng = random.Random(seed)
    wanted = num_train + num_val + num_test
    seen: set[str] = set()
    rows: list[tuple[str, int]] = []
    attempts = 0
    while len(rows) < wanted:
        attempts += 1
        if attempts > 100 * wanted:
            raise ValueError(
                f"could not draw {wanted} distinct expressions with max_depth={max_depth}, max_args={max_args}, "
                f"max_length={max_length}; allow longer or deeper expressions or ask for fewer"
            )
        expression, length = _generate(rng, 1, max_depth, max_args)
        text = to_release_string(expression)
        if length <= max_length and text not in seen:
            seen.add(text)
            rows.append((text, evaluate(expression)))
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    splits = (("train", rows[:num_train]), ("val", rows[num_train : num_train + num_val]))
    for split, split_rows in (*splits, ("test", rows[num_train + num_val :])):
        path = os.path.join(out_dir, f"basic_{split}.tsv")
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.write("Source\tTarget\n")
            f.writelines(f"{text}\t{target}\n" for text, target in split_rows)
        os.replace(tmp, path)
        paths[split] = path
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Generate ListOps data (LRA grammar) in the LRA release layout.", formatter_class=HelpFormatter
    )
    parser.add_argument("out_dir")
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--val", type=int, default=300)
    parser.add_argument("--test", type=int, default=500)
    parser.add_argument("--max-depth", type=int, default=3)
    parser.add_argument("--max-args", type=int, default=5)
    parser.add_argument("--max-length", type=int, default=100, help="tokens, brackets included")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        paths = generate_listops(
            args.out_dir, args.train, args.val, args.test, args.max_depth, args.max_args, args.max_length, args.seed
        )
    except ValueError as e:
        parser.error(str(e))
    print("\n".join(paths.values()))


if __name__ == "__main__":
    main()
