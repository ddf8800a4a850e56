"""Reading params.yaml and the seed rule: what every stage reads of its parameters.

load_params reads params.yaml as DVC writes it (YAML 1.2) and has digit.schema check it,
every problem at once; seed_for derives a stage's seed. The schema itself (types, ranges,
keys) lives in digit/schema.py: it can only make a stage refuse or accept its params, never
change a value a stage reads, so a new key there does not re-run the DAG (tests/test_deps.py).
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from digit.errors import ConfigError

# base.seed steps every stage seed by this much; section seeds stay below it, and the sum stays
# below 2**31 (faiss and numpy's legacy seeding take 32-bit ints).
SEED_STRIDE = 10**6
MAX_BASE_SEED = 2000

# The keys of a pixel decoder's recipe (digit/paint.py) in its section (decoder:, vqgan:): both decoders'
# reports record them, and `digit.sweep --paint` reads them back from the ablation arms. Here, not in
# digit.paint, so that the report and sweep tools read them without importing torch.
RECIPE_KEYS = ("feature_weight", "adv_weight", "disc_start", "adv_start", "token_noise")


def seed_for(params: dict, section: str | None) -> int:
    """The seed a stage uses: its section's seed + SEED_STRIDE * base.seed (section None: base only).

    base.seed = 0 leaves every stage seed as written, so runs recorded before base.seed
    existed reproduce exactly; base.seed = 1, 2, ... re-seeds every stage at once (the
    3-seed spread). The dataset subset (data.seed) and the evaluation sets (evaluate.seed:
    FID reference, KID subsets) are deliberately NOT moved by base.seed: seeds are then
    scored on the same images, and the spread measures the run, not the yardstick.
    """
    own = params[section]["seed"] if section else 0
    return int(own) + SEED_STRIDE * int(params["base"]["seed"])


class Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 booleans: only true/false, never yes/no/on/off.

    DVC reads and writes params.yaml as YAML 1.2 (ruamel): `dvc exp run -S ...`
    rewrites `precision: "no"` as `precision: no`, which YAML 1.1 (PyYAML's
    default) would read as False. With this loader the stages read exactly
    what DVC writes and shows.
    """


Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def load_params(path: str | Path = "params.yaml") -> dict:
    """Read and validate params.yaml; raise ConfigError listing every problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: parameter file not found; run from the project root or pass --params")
    try:
        tree = yaml.load(path.read_text(), Loader=Yaml12Loader) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(tree).__name__}")
    from digit.schema import validate  # here: digit.schema reads SEED_STRIDE from this module

    problems = validate(tree)
    if problems:
        raise ConfigError(f"{path} has {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    return tree
