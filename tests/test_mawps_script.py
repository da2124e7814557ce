"""scripts/mawps_worked_answers.py: worked answers from a problem's numbers, held-out problems left out."""

import json

from conftest import write_jsonl
from scripts.mawps_worked_answers import main, worked_answer


def test_worked_answers_by_hand():
    assert (
        worked_answer("Jose starts with 7 bottle caps. He gets 2 more. How many?", 9.0) == "7 + 2 = 9. The answer is 9."
    )
    assert (
        worked_answer("Joan had 70 seashells and gave some away. She has 27 left. How many did she give?", 43.0)
        == "70 - 27 = 43. The answer is 43."
    )
    assert worked_answer("12 cookies are shared by 4 children. How many each?", 3.0) == "12 / 4 = 3. The answer is 3."
    assert (
        worked_answer("A box holds 1,200 nails; 2.5 boxes hold how many?", 3000.0)
        == "1200 * 2.5 = 3000. The answer is 3000."
    )
    assert worked_answer("Tom has 3 apples and 5 pears.", 100.0) is None


def test_only_the_grpo_training_problems_are_used(tmp_path):
    problems = [
        {"input": f"Ann has {n} apples and gets {n + 1} more. How many?", "target": 2 * n + 1} for n in range(20)
    ]
    data = write_jsonl(tmp_path / "problems.jsonl", problems)
    config = tmp_path / "grpo.yaml"
    config.write_text(
        f"grpo:\n  model: {{name_or_path: smollm2-135m-instruct}}\n  data: {{path: {data}, columns: {{prompt: input, answer: target}}, "
        "eval_fraction: 0.25, system_prompt: 'Answer.'}\n  reward: {function: rlhfkit.reward_functions:numeric_answer}\n"
    )
    output = tmp_path / "worked.jsonl"
    assert main(["--grpo-config", str(config), "--output", str(output)]) == 0
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(rows) == 15  # 20 problems, 5 held out
    assert rows[0]["messages"][0] == {"role": "system", "content": "Answer."}
    from rlhfkit.config.loading import load_config
    from rlhfkit.data.examples import load_examples, prompt_examples

    grpo = load_config("grpo", config)
    _, held_out, _ = load_examples(grpo.data, grpo.train.seed, prompt_examples)
    held_out_questions = {example.prompt[-1]["content"] for example in held_out}
    assert not held_out_questions & {row["messages"][1]["content"] for row in rows}
