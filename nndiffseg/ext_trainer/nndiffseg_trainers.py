# Found by nnunetv2 through nnUNet_extTrainer; see nndiffseg/ext_trainer/__init__.py.
from nndiffseg.trainers import *  # noqa: F401,F403
