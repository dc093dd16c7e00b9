"""Validate IRS_inf,a against known diversity: remove classes from a real test set (paper Fig. 5).

sklearn's bundled digits (1,797 8x8 images, 10 classes) are split per class (stratified) into
train (50%), reference (25%) and test (25%). The train features are the bank, the reference set
gives IRS_inf,real (held-out real data, Sec. 3.4), and the test set, with classes removed one at
a time (random class order per split), is scored as if it were synthetic. A test subset holding
c of the 10 classes can only retrieve about c/10 of the training set, so IRS_inf,a should fall
on the line y = x (fraction of classes kept), reaching ~1 with all classes. Recall (k = 5,
improved precision/recall of Kynkaenniemi et al., real = train, fake = test subset) is printed
alongside for comparison.

Printed: per extractor, mean +- sd over splits of IRS_inf,a and recall for each fraction of
classes kept, and a least-squares line (slope, intercept, R^2) through the means.

    python benchmarks/validate_class_removal.py                     # defaults below
    python benchmarks/validate_class_removal.py --splits 5 --extractors random-inception@75,pixels
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from irs_callbacks.features import extract_features, get_extractor
from irs_callbacks.reference import ReferenceBank


def digits_uint8():
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.from_numpy((data.images / 16 * 255).round().astype(np.uint8)).unsqueeze(1)
    return images, data.target


def make_extractor(spec: str):
    """'name' or 'name@SIZE' (input size), or 'pixels' (raw 8x8 pixels as features)."""
    if spec == "pixels":
        return get_extractor(lambda x: x.flatten(1), input_size=8, custom_name="pixels", device="cpu")
    name, _, size = spec.partition("@")
    return get_extractor(name, device="cpu", **({"input_size": int(size)} if size else {}))


def recall_k(real: torch.Tensor, fake: torch.Tensor, k: int = 5) -> float:
    """Improved recall: fraction of real points inside some fake point's k-NN ball (fake manifold)."""
    real, fake = real.double(), fake.double()
    radii = torch.cdist(fake, fake).kthvalue(k + 1, dim=1).values  # k-th neighbour, self excluded
    return float((torch.cdist(real, fake) <= radii[None, :]).any(dim=1).double().mean())


def stratified_split(labels, seed):
    from sklearn.model_selection import train_test_split

    index = np.arange(len(labels))
    train, rest = train_test_split(index, train_size=0.5, stratify=labels, random_state=seed)
    reference, test = train_test_split(rest, train_size=0.5, stratify=labels[rest], random_state=seed)
    return train, reference, test


def fit_line(x, y):
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (slope * x + intercept)
    return slope, intercept, 1.0 - residual.var() / y.var()


def run(spec: str, images, labels, splits: int, k: int) -> dict:
    started = time.perf_counter()
    extractor = make_extractor(spec)
    features = extract_features(extractor, images, batch_size=64, progress=True)
    extract_s = time.perf_counter() - started
    classes = np.unique(labels)
    irs = np.zeros((splits, len(classes)))
    recall = np.zeros((splits, len(classes)))
    real = []
    for split in range(splits):
        train, reference, test = stratified_split(labels, seed=split)
        bank = ReferenceBank.from_features(features[train], reference_features=features[reference],
                                           extractor_identity=extractor.identity)
        real.append(bank.real.estimate)
        order = np.random.default_rng(1000 + split).permutation(classes)
        for c in range(1, len(classes) + 1):
            subset = test[np.isin(labels[test], order[:c])]
            irs[split, c - 1] = bank.score(features[subset]).adjusted
            recall[split, c - 1] = recall_k(features[train], features[subset], k)
    fraction = np.arange(1, len(classes) + 1) / len(classes)
    return {"spec": spec, "fraction": fraction, "irs": irs, "recall": recall, "real": np.array(real),
            "extract_s": extract_s, "total_s": time.perf_counter() - started, "n_train": len(train)}


def report(result: dict) -> None:
    fraction, irs, recall = result["fraction"], result["irs"], result["recall"]
    print(f"\n== {result['spec']}: {irs.shape[0]} splits, N_train = {result['n_train']}, "
          f"IRS_inf,real = {result['real'].mean():.3f} +- {result['real'].std():.3f}  "
          f"(features {result['extract_s']:.0f} s, total {result['total_s']:.0f} s)")
    print(f"{'kept':>6} {'IRS_inf,a':>16} {'recall@5':>16}")
    for i, f in enumerate(fraction):
        print(f"{f:6.1f} {irs[:, i].mean():8.3f} +- {irs[:, i].std():.3f} {recall[:, i].mean():8.3f} +- "
              f"{recall[:, i].std():.3f}")
    for label, values in (("IRS_inf,a", irs), ("recall@5", recall)):
        slope, intercept, r2 = fit_line(fraction, values.mean(axis=0))
        print(f"{label:>10} vs fraction kept: slope {slope:.3f}, intercept {intercept:.3f}, R^2 {r2:.4f}; "
              f"all classes kept: {values[:, -1].mean():.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--extractors", default="random-inception,random-inception@75,pixels",
                        help="comma-separated: NAME, NAME@INPUT_SIZE or 'pixels'")
    parser.add_argument("--splits", type=int, default=5)
    parser.add_argument("--k", type=int, default=5, help="k of the recall's k-NN balls")
    args = parser.parse_args()
    images, labels = digits_uint8()
    for spec in args.extractors.split(","):
        report(run(spec.strip(), images, labels, args.splits, args.k))


if __name__ == "__main__":
    main()
