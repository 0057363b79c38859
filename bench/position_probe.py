"""Where does the micro Solver lose positions? Linear probes along its path.

"where is the red circle relative to the blue square ?" needs the place of two named
objects at the answer token. This script fits linear probes (multinomial logistic
regression, 70/30 split) at each stage an image's positions pass through:

- image tokens: the column (of 8) of each patch, at the vision encoder's output, at the
  aligner's output (what the language model reads) and after each language-model layer;
- the answer token (the prompt and the answer's opening tag): the true answer, and which
  half of the canvas (left or right) each of the two named objects (A and B) is in, after
  each layer.

A probe at the majority rate means the information is not linearly there.

    python bench/position_probe.py                  # the shipped model
    python bench/position_probe.py --model runs/micro/model --questions 400
"""

from __future__ import annotations

import argparse
import random

import torch
from rich.console import Console
from rich.table import Table

from asg_kit import prompts
from asg_kit.adapters.registry import load_backbone
from asg_kit.micro import world

ANSWERS = ("left", "right", "above", "below")


def probe_accuracy(features: torch.Tensor, labels: torch.Tensor, steps: int = 300, train_share: float = 0.7) -> float:
    """Held-out accuracy of a linear classifier fitted on the first ``train_share`` rows."""
    n = int(len(features) * train_share)
    mean, std = features[:n].mean(0), features[:n].std(0) + 1e-5
    x = (features - mean) / std
    classes = int(labels.max()) + 1
    weight = torch.zeros(x.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=0.05)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x[:n] @ weight + bias, labels[:n]) + 1e-3 * weight.square().sum()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return float(((x[n:] @ weight + bias).argmax(1) == labels[n:]).float().mean())


def majority_share(labels: torch.Tensor, train_share: float = 0.7) -> float:
    held_out = labels[int(len(labels) * train_share) :]
    return float(held_out.bincount().max()) / len(held_out)


def named_object(scene: world.Scene, reference: str) -> world.Obj:
    return next(o for o in scene.objects if reference in (f"the {o.shape}", f"the {o.color} {o.shape}"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="micro model folder (default: the shipped one)")
    parser.add_argument("--questions", type=int, default=800, help="two-object position questions (answer-token probes)")
    parser.add_argument("--images", type=int, default=200, help="of those, images whose patches are probed")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    backbone = load_backbone("micro", model=args.model)
    model = backbone.model
    # The answer token: where the Solver writes "left" after its answer's opening tag.
    left, right = (backbone.encode_completion(prompts.format_answer(word)) for word in ("left", "right"))
    opening = left[: next(i for i, (a, b) in enumerate(zip(left, right)) if a != b)]

    rng = random.Random(f"position-probe-{args.seed}")
    answer_states, targets = [], {"answer": [], "A's half": [], "B's half": []}
    patch_states: dict[str, list[torch.Tensor]] = {}
    while len(answer_states) < args.questions:
        scene = world.sample_scene(rng, n_objects=2)
        asked = [qa for qa in world.scene_questions(scene) if qa.kind == "position"]
        if not asked:
            continue
        qa = rng.choice(asked)
        ref_a, ref_b = qa.question.removeprefix("where is ").removesuffix(" ?").split(" relative to ")
        a, b = named_object(scene, ref_a), named_object(scene, ref_b)
        ids = backbone.prompt_ids(prompts.solver_prompt(qa.question), with_image=True) + opening
        pixels = backbone.processor.image_processor([world.render(scene)], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            vision = model.model.vision_model(pixel_values=pixels).last_hidden_state[0]
            hidden = model(input_ids=torch.tensor([ids]), pixel_values=pixels, output_hidden_states=True).hidden_states
        answer_states.append(torch.stack([h[0, -1] for h in hidden]))
        targets["answer"].append(ANSWERS.index(qa.answer))
        targets["A's half"].append(int(a.cx > 0.5))
        targets["B's half"].append(int(b.cx > 0.5))
        if len(answer_states) <= args.images:
            slots = torch.tensor(ids) == backbone.image_token_id
            patch_states.setdefault("vision encoder", []).append(vision)
            for layer, h in enumerate(hidden):
                patch_states.setdefault("aligner (LM input)" if layer == 0 else f"LM layer {layer}", []).append(h[0, slots])

    console = Console()
    encoded = patch_states["vision encoder"]  # one (patches, width) tensor per probed image
    patches = encoded[0].shape[0]
    columns = (torch.arange(patches) % round(patches**0.5)).repeat(len(encoded))
    shuffle = torch.randperm(len(columns))
    table = Table(title="image tokens: patch column")
    table.add_column("stage")
    table.add_column("probe accuracy", justify="right")
    table.add_row("majority", f"{majority_share(columns[shuffle]):.2f}")
    for stage, states in patch_states.items():
        table.add_row(stage, f"{probe_accuracy(torch.cat(states)[shuffle], columns[shuffle]):.2f}")
    console.print(table)

    states = torch.stack(answer_states)
    table = Table(title='answer token of "where is A relative to B ?"')
    table.add_column("target")
    table.add_column("majority", justify="right")
    for layer in range(states.shape[1]):
        table.add_column("LM input" if layer == 0 else f"layer {layer}", justify="right")
    for target, values in targets.items():
        labels = torch.tensor(values)
        table.add_row(target, f"{majority_share(labels):.2f}", *(f"{probe_accuracy(states[:, layer], labels):.2f}" for layer in range(states.shape[1])))
    console.print(table)


if __name__ == "__main__":
    main()
