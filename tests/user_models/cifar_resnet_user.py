"""The akamaster CIFAR ResNet as its users write it: the module lives in ``examples/cifar_resnet.py`` (the README's
worked example prunes it); loaded here from that file, as edgeprune loads ``examples/cifar_resnet.py:resnet20``."""
import importlib.util
from pathlib import Path

_PATH = Path(__file__).resolve().parents[2] / "examples" / "cifar_resnet.py"
_spec = importlib.util.spec_from_file_location("tests_user_models_cifar_resnet", _PATH)
_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mod)

ResNet, BasicBlock, LambdaLayer = _mod.ResNet, _mod.BasicBlock, _mod.LambdaLayer
resnet20, resnet32, resnet44, resnet56 = _mod.resnet20, _mod.resnet32, _mod.resnet44, _mod.resnet56
