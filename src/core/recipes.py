"""Recipes: the values of the knobs params.yaml leaves null, by one switch (`recipe`).

A knob set in params.yaml (or by `dvc exp run -S`) always wins; a null one takes the recipe's
value. Every stage and MLflow see the effective values; metrics/train.json records the ones the
recipe filled, so `dvc exp show` lists them too.

- digits: the built-in sample, 8x8 digits scaled up: no flips (a mirrored 2 is no digit), mild crops.
- photo: photos from scratch in a 3-minute budget, found by ablations and a search on flowers_dev
  (benchmarks/README.md "Photo recipe"): resnet18 with half the channels at 112 px (a quarter of
  the compute per pixel: twice the pixels in more epochs than the full width at 80 px), small
  crops first (progressive resizing), flips, random erasing, label smoothing, AdamW with
  decoupled weight decay and warm-up, a weight average.
- photo with model.pretrained: fine-tuning: the weights are good already, so a lower learning
  rate, less weight decay and a shorter warm-up, which keep what they know (the tutorial used
  Adam at 1e-4 for a few epochs); resnet18 at 80 px, the network torchvision has weights for
  (a checkpoint of ours is fine-tuned as the arch it was trained as: the train stage's
  `arch_as_trained`).
`auto` picks digits for `data.source: sample`, else photo.
"""
DIGITS = {
    "arch": "resnet18", "data.image_size": 64, "data.eval_image_size": 0,
    "train.epochs": 6, "train.time_budget": 0, "train.batch_size": 64, "train.start_image_size": 0,
    "train.optimizer": "adam", "train.lr": 0.002, "train.weight_decay": 0.0, "train.warmup_epochs": 0,
    "train.crop_scale": [0.6, 1.0], "train.hflip": 0.0, "train.random_erasing": 0.0,
    "train.label_smoothing": 0.0, "train.ema_decay": 0.0,
}
PHOTO = {
    "arch": "resnet18_w32", "data.image_size": 112, "data.eval_image_size": 0,
    "train.epochs": 30, "train.time_budget": 3, "train.batch_size": 32, "train.start_image_size": 64,
    "train.optimizer": "adamw", "train.lr": 0.002, "train.weight_decay": 0.05, "train.warmup_epochs": 2,
    "train.crop_scale": [0.25, 1.0], "train.hflip": 0.5, "train.random_erasing": 0.25,
    "train.label_smoothing": 0.1, "train.ema_decay": 0.998,
}
PHOTO_FINETUNE = {**PHOTO, "arch": "resnet18", "data.image_size": 80, "train.start_image_size": 48,
                  "train.lr": 5e-4, "train.weight_decay": 0.01, "train.warmup_epochs": 1}
RECIPES = {"digits": DIGITS, "photo": PHOTO, "photo-finetune": PHOTO_FINETUNE}
CHOICES = ("auto", "photo", "digits")


def recipe_name(params):
    """The recipe `params` get: digits, photo or photo-finetune."""
    name = params["recipe"]
    if name == "auto":
        name = "digits" if params["data"]["source"] == "sample" else "photo"
    if name == "photo" and params["model"]["pretrained"] != "none":
        name = "photo-finetune"
    return name


def fill(params):
    """(params with every null knob set from the recipe, {knob: value} of those filled). Leaves
    anything malformed as it is, for the schema to name."""
    try:
        name = recipe_name(params)
    except (KeyError, TypeError):
        return params, {}
    filled = {}
    for knob, value in RECIPES.get(name, {}).items():
        *section, key = knob.split(".")  # "arch" is top-level, "train.lr" in a section
        node = params.get(section[0]) if section else params
        if isinstance(node, dict) and key in node and node[key] is None:
            node[key] = filled[knob] = value
    return params, filled


def nested(knobs):
    """{"train.lr": 0.002, "arch": "x"} nested as params.yaml is: {"train": {"lr": 0.002}, "arch": "x"}."""
    tree = {}
    for knob, value in knobs.items():
        *section, key = knob.split(".")
        (tree.setdefault(section[0], {}) if section else tree)[key] = value
    return tree
