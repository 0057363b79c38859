import random

import numpy as np
import pytest

from asg_kit import geneval
from asg_kit.micro import world
from asg_kit.micro.detector import detect, matches_scene
from asg_kit.micro.pool import write_pool


def test_scenes_are_seeded_and_valid():
    a = [world.sample_scene(random.Random(7)) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    rng = random.Random(0)
    for _ in range(300):
        scene = world.sample_scene(rng)
        assert 1 <= len(scene.objects) <= 4
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.box
            assert 0 < x0 < x1 < 1 and 0 < y0 < y1 < 1
        for i, a_ in enumerate(scene.objects):
            for b in scene.objects[i + 1 :]:
                assert world._boxes_apart(a_, b)
    assert {o.shape for s in [world.sample_scene(rng) for _ in range(200)] for o in s.objects} == set(world.SHAPES)


def test_render_is_deterministic_antialiased_and_sized():
    scene = world.sample_scene(random.Random(3))
    first, second = world.render(scene), world.render(scene)
    assert first.size == (64, 64) and np.array_equal(np.asarray(first), np.asarray(second))
    pixels = {tuple(p) for p in np.asarray(first).reshape(-1, 3)}
    assert len(pixels) > len(scene.objects) + 1  # blended edge colours exist
    assert world.render(scene, size=128).size == (128, 128)


def test_detector_recovers_1000_fresh_scenes():
    rng = random.Random(20261122)
    scenes = [world.sample_scene(rng) for _ in range(1000)]
    recovered = sum(matches_scene(detect(world.render(s)), s) for s in scenes)
    assert recovered / 1000 >= 0.99


def test_detector_at_other_sizes_and_on_empty_canvas():
    rng = random.Random(5)
    scenes = [world.sample_scene(rng) for _ in range(50)]
    assert sum(matches_scene(detect(world.render(s, size=128)), s) for s in scenes) >= 49
    assert detect(world.render(world.Scene(()))) == []


def test_questions_have_true_answers():
    rng = random.Random(11)
    for _ in range(100):
        scene = world.sample_scene(rng)
        for qa in world.scene_questions(scene):
            if qa.kind == "count" and qa.question == "how many objects are there ?":
                assert qa.answer == str(len(scene.objects))
            if qa.kind == "exist":
                words = qa.question.split()
                assert (qa.answer == "yes") == (scene.count(shape=words[4], color=words[3]) > 0)
            if qa.kind == "color" and qa.question.startswith("what color is the ") and len(qa.question.split()) == 6:
                shape = qa.question.split()[4]
                assert [o.color for o in scene.objects if o.shape == shape] == [qa.answer]
    kinds = {world.sample_question(world.sample_scene(rng), rng).kind for _ in range(300)}
    assert kinds == {"color", "shape", "count", "exist", "position", "yesno"}


def drawn_pairs(make_pair, kind: str, rng: random.Random, scenes: int = 200) -> list:
    """The pairs ``make_pair(scene, rng)`` draws on random scenes, each checked to be two of
    the scene's own questions, and None exactly when the scene asks no question of ``kind``."""
    pairs = []
    for _ in range(scenes):
        scene = world.sample_scene(rng)
        truth = {qa.question: qa for qa in world.scene_questions(scene)}
        pair = make_pair(scene, rng)
        assert (pair is None) == (not any(qa.kind == kind for qa in truth.values()))
        if pair:
            assert all(truth[qa.question] == qa for qa in pair)
            pairs.append(pair)
    return pairs


def test_contrasting_relation_questions_are_the_scenes_own_and_differ_in_the_relation():
    """The pair is two of the scene's own yes/no questions, "yes" then "no", differing only
    in the relation (the one that does not hold is the opposite or a perpendicular one;
    only the opposite when ``opposite_share`` is 1); None exactly when the scene asks no
    yes/no."""
    rng = random.Random(12)
    others = {"opposite": 0, "perpendicular": 0}
    pairs = drawn_pairs(world.contrasting_relation_questions, "yesno", rng)
    for held, unseen in pairs:
        assert held.answer == "yes" and unseen.answer == "no"
        relation, other = (next(r for r in world.RELATIONS if f" {r} " in qa.question) for qa in (held, unseen))
        assert unseen.question == held.question.replace(f" {relation} ", f" {other} ")
        others["opposite" if {relation, other} in ({"left of", "right of"}, {"above", "below"}) else "perpendicular"] += 1
    assert len(pairs) > 100 and min(others.values()) > 20
    for _ in range(100):  # the judge stage's first phases: the "no" is always the opposite
        pair = world.contrasting_relation_questions(world.sample_scene(rng, n_objects=2), rng, opposite_share=1.0)
        if pair:
            relation, other = (next(r for r in world.RELATIONS if f" {r} " in qa.question) for qa in pair)
            assert {relation, other} in ({"left of", "right of"}, {"above", "below"})


def test_converse_position_questions_are_the_scenes_own_with_the_names_swapped():
    """"where is A relative to B ?" then "where is B relative to A ?": both the scene's own
    questions, the names in swapped order, opposite answers; None exactly when the scene asks
    no position question."""
    opposite = {"left": "right", "right": "left", "above": "below", "below": "above"}
    pairs = drawn_pairs(world.converse_position_questions, "position", random.Random(5))
    for forward, backward in pairs:
        a, b = forward.question.removeprefix("where is ").removesuffix(" ?").split(" relative to ")
        assert backward.question == f"where is {b} relative to {a} ?"
        assert backward.answer == opposite[forward.answer]
    assert len(pairs) > 100


def test_side_questions_name_the_side_of_the_canvas_read_back_by_the_detector():
    """"where is the circle ?": for each named object clearly off the centre along one axis,
    that side, as the detector reads the object's centre from the pixels; none for an
    object near the centre or on a diagonal; never among the scene's own (benchmark) questions."""
    from asg_kit.micro import detector

    rng = random.Random(11)
    asked = []
    for _ in range(200):
        scene = world.sample_scene(rng)
        found = {(d.shape, d.color): d.center for d in detector.detect(world.render(scene))}
        for qa in world.side_questions(scene):
            name = qa.question.removeprefix("where is the ").removesuffix(" ?").split()
            obj = next(o for o in scene.objects if o.shape == name[-1] and (len(name) == 1 or o.color == name[0]))
            dx, dy = (c - 0.5 for c in found[(obj.shape, obj.color)])
            expected = ("left" if dx < 0 else "right") if abs(dx) > abs(dy) else ("above" if dy < 0 else "below")
            assert qa.answer == expected and qa.kind == "side"
            assert qa.question not in {q.question for q in world.scene_questions(scene)}
            asked.append(qa.answer)
    assert set(asked) == {"left", "right", "above", "below"} and len(asked) > 150
    centre = world.Scene((world.Obj("circle", "red", "small", 0.55, 0.45),))
    diagonal = world.Scene((world.Obj("circle", "red", "small", 0.2, 0.2),))
    assert world.side_questions(centre) == world.side_questions(diagonal) == []
    assert world.side_questions(world.Scene((world.Obj("circle", "red", "small", 0.2, 0.5),))) == [world.QA("where is the circle ?", "left", "side")]


def test_relations_follow_geneval_rule():
    left = (0.1, 0.4, 0.3, 0.6)
    right = (0.7, 0.4, 0.9, 0.6)
    assert geneval.relations(left, right) == {"left of"}
    assert geneval.relations(right, left) == {"right of"}
    assert geneval.relations((0.1, 0.1, 0.3, 0.3), (0.7, 0.7, 0.9, 0.9)) == {"left of", "above"}
    assert geneval.relations((0.4, 0.4, 0.6, 0.6), (0.42, 0.41, 0.62, 0.61)) == set()  # too close: no relation


def test_prompts_have_geneval_metadata_and_satisfiable_scenes():
    rng = random.Random(2)
    for category in geneval.CATEGORIES:
        for _ in range(20):
            meta = world.sample_prompt(rng, category)
            assert meta["tag"] == category and meta["prompt"].startswith("a photo of")
            scene = world.scene_for_prompt(meta, rng)
            found = [geneval.FoundObject(d.shape, d.box, d.color) for d in detect(world.render(scene))]
            assert geneval.judge(meta, found) == (True, "correct")
    with pytest.raises(ValueError, match="categories"):
        world.sample_prompt(rng, "style")


def _obj(cls, box, color=None, score=1.0):
    return geneval.FoundObject(cls, box, color, score)


def test_geneval_judge_rules_on_given_detections():
    counting = {"tag": "counting", "include": [{"class": "circle", "count": 2}], "exclude": [{"class": "circle", "count": 3}]}
    two = [_obj("circle", (0.1, 0.1, 0.2, 0.2)), _obj("circle", (0.5, 0.5, 0.6, 0.6))]
    assert geneval.judge(counting, two)[0]
    assert not geneval.judge(counting, two[:1])[0]
    assert "circle<3" in geneval.judge(counting, two + [_obj("circle", (0.8, 0.8, 0.9, 0.9))])[1]
    colors = {"tag": "colors", "include": [{"class": "square", "count": 1, "color": "red"}]}
    assert geneval.judge(colors, [_obj("square", (0, 0, 0.1, 0.1), "red")])[0]
    # the most confident square decides
    assert not geneval.judge(colors, [_obj("square", (0, 0, 0.1, 0.1), "blue", 0.9), _obj("square", (0.5, 0.5, 0.6, 0.6), "red", 0.5)])[0]
    position = {"tag": "position", "include": [{"class": "square", "count": 1}, {"class": "circle", "count": 1, "position": ["left of", 0]}]}
    assert geneval.judge(position, [_obj("square", (0.7, 0.4, 0.9, 0.6)), _obj("circle", (0.1, 0.4, 0.3, 0.6))])[0]
    verdict = geneval.judge(position, [_obj("square", (0.1, 0.4, 0.3, 0.6)), _obj("circle", (0.7, 0.4, 0.9, 0.6))])
    assert verdict == (False, "expected circle left of target, found right of")
    attr = {"tag": "color_attr", "include": [{"class": "circle", "count": 1, "color": "red"}, {"class": "cross", "count": 1, "color": "blue"}]}
    assert not geneval.judge(attr, [_obj("circle", (0, 0, 0.1, 0.1), "blue"), _obj("cross", (0.5, 0.5, 0.6, 0.6), "red")])[0]


def test_geneval_summary_is_mean_of_category_means():
    rows = [{"tag": "single_object", "correct": True}] * 3 + [{"tag": "single_object", "correct": False}]
    rows += [{"tag": "position", "correct": False}] * 2
    summary = geneval.summarize(rows)
    assert summary["categories"]["single_object"] == 0.75 and summary["categories"]["position"] == 0.0
    assert summary["categories"]["counting"] is None
    assert summary["overall"] == pytest.approx(0.375) and summary["images"] == 6


def test_pool_has_images_and_nothing_else(tmp_path):
    paths = write_pool(6, tmp_path / "pool", seed=3)
    assert sorted(p.name for p in (tmp_path / "pool").iterdir()) == [f"{i:06d}.png" for i in range(6)]
    again = write_pool(6, tmp_path / "again", seed=3)
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(paths, again))
