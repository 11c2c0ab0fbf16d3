"""A GAN on scikit-learn's handwritten digits, through a manual step: two models, two
optimizers, two updates per batch, and loopy still does the rest (device, shuffling, progress,
history, validation, checkpoints). A classifier trained on the real digits judges the result.

    python examples/gan_digits.py [--epochs 30] [--plot gan_digits.png]
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

import digits
import loopy

args = digits.arguments(__file__, __doc__, epochs=30)
(X, y), (X_val, y_val) = digits.load(shape=(64,))
NOISE = 16

torch.manual_seed(0)  # the initial weights; fit(seed=0) below seeds the shuffling and the noise
gan = nn.ModuleDict({
    "generator": nn.Sequential(nn.Linear(NOISE, 128), nn.ReLU(), nn.Linear(128, 64),
                               nn.Sigmoid()),
    "discriminator": nn.Sequential(nn.Linear(64, 128), nn.LeakyReLU(0.2), nn.Dropout(0.3),
                                   nn.Linear(128, 1)),
})
optimizers = {name: torch.optim.Adam(gan[name].parameters(), lr=2e-3, betas=(0.5, 0.999))
              for name in ("discriminator", "generator")}


def gan_step(model, batch, loop):
    """One batch: the discriminator learns real from generated digits, then the generator
    learns to pass as real. In validation (no grad, eval mode) the helpers do nothing and the
    same code measures the losses and the discriminator's accuracy."""
    real, _ = batch
    fake = model["generator"](torch.randn(len(real), NOISE, device=real.device))
    scores = model["discriminator"](torch.cat([real, fake.detach()])).squeeze(1)
    labels = torch.cat([torch.ones(len(real)), torch.zeros(len(real))]).to(real.device)
    loss_d = F.binary_cross_entropy_with_logits(scores, labels)
    loop.backward(loss_d)
    loop.step_optimizer("discriminator")

    scores_g = model["discriminator"](fake).squeeze(1)
    loss_g = F.binary_cross_entropy_with_logits(scores_g, torch.ones_like(scores_g))
    loop.backward(loss_g, "generator")    # only the generator's parameters get gradients
    loop.step_optimizer("generator")
    return {"loss_d": loss_d.detach(), "loss_g": loss_g.detach(),
            "d_acc": loopy.accuracy(scores.detach(), labels)}


untrained_generator = copy.deepcopy(gan["generator"]).eval()
loop = loopy.fit(gan, None, optimizers, (X, y), batch_size=32, shuffle=True, epochs=args.epochs,
                 step=gan_step, val_loader=(X_val, y_val), seed=0)

# How good are the generated digits? Their distance to the nearest training digit: real
# validation digits give the floor, uniform noise and the untrained generator the ceiling.
# That nearest digit's label tells which digits the generator draws (all ten, or a few?).
def nearest(images):
    distances = torch.cdist(images, X)
    return distances.min(dim=1).values.mean().item(), y[distances.argmin(dim=1)]


with torch.no_grad():
    noise = torch.randn(1000, NOISE)
    samples = gan["generator"].eval()(noise)
    distance, labels = nearest(samples)
    untrained = untrained_generator(noise)
classes = labels.bincount(minlength=10)
print(f"distance to the nearest training digit: generated {distance:.3f}, real (validation) "
      f"{nearest(X_val)[0]:.3f}, untrained generator {nearest(untrained)[0]:.3f}, uniform noise "
      f"{nearest(torch.rand(1000, 64))[0]:.3f}")
print(f"generated digits per class (the nearest's label): {classes.tolist()}")
digits.report({"loss_d": loop.metrics["val_loss_d"], "loss_g": loop.metrics["val_loss_g"],
               "d_acc": loop.metrics["val_d_acc"], "distance": distance,
               "classes": float((classes >= 20).sum())})


def plot(images, path):
    """Save a 6x12 grid of generated digits to ``path``; nothing without matplotlib."""
    if not path:
        return
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    figure, axes = plt.subplots(6, 12, figsize=(6, 3), dpi=80)
    for axis, image in zip(axes.flat, images):
        axis.imshow(image.reshape(8, 8), cmap="gray_r", vmin=0, vmax=1)
        axis.axis("off")
    figure.suptitle(f"generated digits after {len(loop.history['loss_d'])} epochs")
    figure.savefig(path)
    plt.close(figure)
    print(f"plot saved to {path}")


plot(samples[:72], args.plot)
