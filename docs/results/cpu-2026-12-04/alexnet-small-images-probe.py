"""Why does AlexNet sit at chance on 8x8 grayscale images? Train it with the evaluation protocol
(DSA on, lr 0.01, momentum 0.9, wd 5e-4, 300 epochs) on 10 CIFAR-100 classes downsampled to 8x8
gray, 50 images/class, and watch training accuracy and the share of dead ReLUs per layer."""
import sys, torch, torch.nn.functional as F
from moedd.data import load_prepared
from moedd.config import EvaluateConfig, FusionConfig
from moedd.evaluate import TrainingSet, train_network, test_accuracy
from moedd.nets import create_net

torch.manual_seed(0)
prep = load_prepared("/tmp/c100run/data/cifar100/prepared")
size, gray = int(sys.argv[1]), sys.argv[2] == "gray"
def take(images, labels, per):
    idx = torch.cat([torch.nonzero(labels == c).flatten()[:per] for c in range(10)])
    x = images[idx].float() / 255
    if gray:
        x = x.mean(1, keepdim=True)
    x = F.interpolate(x, size=(size, size), mode="area")
    x = (x - x.mean((0, 2, 3), keepdim=True)) / x.std((0, 2, 3), keepdim=True)
    return x, labels[idx]
xtr, ytr = take(prep.train_images, prep.train_labels, int(sys.argv[5]) if len(sys.argv) > 5 else 50)
xte, yte = take(prep.test_images, prep.test_labels, 100)
cfg = EvaluateConfig(epochs=int(sys.argv[4]) if len(sys.argv) > 4 else 300, dsa=sys.argv[3] == "dsa", checkpoint_every=100000)
data = TrainingSet(xtr, ytr, torch.zeros(len(ytr), dtype=torch.long), 0.01)
for net_name in sys.argv[6].split(",") if len(sys.argv) > 6 else ("convnet3", "alexnet"):
    accs = []
    net = train_network(net_name, data, cfg, FusionConfig(kind="none"), 0, 10,
                        on_stats=lambda e, a, l: accs.append((e, round(100 * a, 1), round(l, 3))) if e % 50 == 0 or e == 1 else None)
    dead = []
    h = xtr
    net.eval()
    with torch.no_grad():
        for m in net.features:
            h = m(h)
            if isinstance(m, torch.nn.ReLU):
                dead.append(round(float((h.flatten(1).amax(0) <= 0).float().mean()), 2))  # units never active on any image
        logits = net.classifier(h.flatten(1))
    print(net_name, size, "gray" if gray else "rgb", "dsa" if cfg.dsa else "nodsa", "curve", accs,
          "test", round(100 * test_accuracy(net, xte, yte, 1000), 1), "dead-per-relu", dead,
          "feature", tuple(h.shape[1:]), "logit std", round(float(logits.std(0).mean()), 4), flush=True)
# logit scale at initialisation, 8 vs 32 px
for s in (8, 32):
    torch.manual_seed(0)
    for name in ("convnet3", "alexnet"):
        n = create_net(name, num_classes=10, channels=xtr.shape[1], image_size=s)
        x = torch.randn(256, xtr.shape[1], s, s)
        with torch.no_grad():
            print("init", name, s, "logit std", round(float(n(x).std(0).mean()), 5), flush=True)
