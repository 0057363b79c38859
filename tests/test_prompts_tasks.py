import random

from asg_kit import prompts
from asg_kit.micro import tasks, world
from asg_kit.rewards import GenerationSpec, split_answer


def test_spec_text_round_trips():
    spec = GenerationSpec.from_pairs("a red circle left of a blue square", [("what color is the circle ?", "red"), ("how many objects are there ?", "2")])
    text = prompts.format_spec(spec)
    assert text == "draw : a red circle left of a blue square | what color is the circle ? red | how many objects are there ? 2"
    assert prompts.parse_spec(text) == spec
    assert prompts.parse_spec("draw : just a prompt") == GenerationSpec("just a prompt")
    assert prompts.parse_spec("draw :   | what ? x") is None
    assert prompts.parse_spec("a cat | no question mark here").qa == ()


def test_parse_question_and_solver_prompt():
    assert prompts.parse_question("what color is it? extra\nmore") == "what color is it ?"
    assert prompts.parse_question("\n\nno mark") == "no mark"
    assert prompts.solver_prompt("q ?", 3).startswith(prompts.SOLVER_FRAMINGS[3])
    assert len(set(prompts.SOLVER_FRAMINGS)) == 7
    assert split_answer(prompts.format_answer("red"))[0] == "red"


def test_every_task_text_is_in_the_vocabulary():
    from asg_kit.adapters.tiny_janus import build_word_tokenizer

    tokenizer = build_word_tokenizer(tasks.vocabulary())
    rng = random.Random(99)
    for _ in range(300):
        example = tasks.text_example(rng, image_size=8)
        drawing = tasks.image_example(rng, image_size=8)
        for text in (example.prompt, example.target, drawing.prompt, prompts.CAPTION, prompts.EMBED_PROBE):
            assert tokenizer.unk_token_id not in tokenizer(text)["input_ids"], text


def test_examples_are_true_of_their_images():
    from asg_kit.micro.benchmarks import judge_image

    rng = random.Random(4)
    drawings = [tasks.image_example(rng) for _ in range(80)]
    judged = [judge_image(d.metadata, d.image) for d in drawings if d.metadata]
    assert len(judged) > 40 and all(verdict == (True, "correct") for verdict in judged)
    spec_example = tasks.text_example(random.Random(1), "spec")
    assert prompts.parse_spec(spec_example.target).qa
