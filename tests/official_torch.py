"""The official RD-family modules, losses and maps restated in PyTorch (test oracle only).

Restated from the official repositories (read at the commits of
``rd_family.md`` §0.1) with their module and parameter names, so that their
``state_dict()`` is what the official scripts save:

- ``BN_layer``: RD4AD ``resnet.py:BN_layer`` (= SK-RD4AD's, MRKD's and URD's),
  including the ``conv4`` / ``bn4`` that its forward never uses. Its blocks are
  ``AttnBasicBlock`` / ``AttnBottleneck``, whose attention is commented out:
  torchvision's ``BasicBlock`` / ``Bottleneck``, used here.
- ``Decoder``: RD4AD ``de_resnet.py:ResNet`` with its deconvolution blocks, and
  SK-RD4AD's ``forward(x, y, res)`` (``res != 0``: both skips).
- ``MRKDDecoder``: MRKD ``de_resnet.py:ResNet`` (the unused ``conv1``, the
  ``generation1..3`` heads, the random spatial mask; ``mask=False`` turns it
  off, as our deterministic evaluation does).
- ``URDTeacher`` / ``URDStudent``: URD ``models/teacher.py`` / ``student.py``
  (``forward_decoder_wogii`` when ``attn=True``, as released; ``gii`` otherwise).
- The losses: RD4AD ``loss_fucntion``, SK-RD4AD ``loss_function`` and
  ``loss_function_2``; the map: RD4AD ``test.py:cal_anomaly_map`` + scipy's
  ``gaussian_filter(sigma=4)``, score = max.

Sizes follow the teacher: ``channels`` (C1, C2, C3) = (64, 128, 256) for
resnet18 (BasicBlock, expansion 1) and (256, 512, 1024) for the bottleneck
teachers. The official constructors take the block counts, so tests use one
block per stage. Two literal sizes of the official code are restated for any
input size: ``loss_function_2`` up-samples to 32 and 64 px (E2's and E1's
sizes at 256 px), and MRKD's heads and ``conv1`` are built for 1024/512/256
channels (wide_resnet50_2); here they follow the teacher's levels.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter
import torch_oracle

torch, torchvision, TORCH_REASON = torch_oracle.import_torch()
if torch is not None:
  from torch import nn
  from torch.nn import functional as F
  from torchvision.models.resnet import BasicBlock as EncoderBasicBlock
  from torchvision.models.resnet import Bottleneck as EncoderBottleneck


def conv3x3(in_planes, out_planes, stride=1):
  return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes, out_planes, stride=1):
  return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


def deconv2x2(in_planes, out_planes, stride=1):
  return nn.ConvTranspose2d(in_planes, out_planes, kernel_size=2, stride=stride, bias=False)


def _official_init(module):
  """The init loop of the official constructors."""
  for m in module.modules():
    if isinstance(m, nn.Conv2d):
      nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(m, nn.BatchNorm2d):
      nn.init.constant_(m.weight, 1)
      nn.init.constant_(m.bias, 0)


# ----------------------------------------------------------------------------- OCBE


if torch is not None:

  class BN_layer(nn.Module):  # noqa: N801 (the official name)
    """RD4AD ``resnet.py:BN_layer``: MFF + OCE, with the unused ``conv4`` / ``bn4``."""

    def __init__(self, block, layers, width_per_group=64):
      super().__init__()
      self._norm_layer = nn.BatchNorm2d
      self.groups = 1
      self.base_width = width_per_group
      self.inplanes = 256 * block.expansion
      self.dilation = 1
      self.bn_layer = self._make_layer(block, 512, layers, stride=2)
      e = block.expansion
      self.conv1 = conv3x3(64 * e, 128 * e, 2)
      self.bn1 = nn.BatchNorm2d(128 * e)
      self.relu = nn.ReLU(inplace=True)
      self.conv2 = conv3x3(128 * e, 256 * e, 2)
      self.bn2 = nn.BatchNorm2d(256 * e)
      self.conv3 = conv3x3(128 * e, 256 * e, 2)
      self.bn3 = nn.BatchNorm2d(256 * e)
      self.conv4 = conv1x1(1024 * e, 512 * e, 1)
      self.bn4 = nn.BatchNorm2d(512 * e)
      _official_init(self)

    def _make_layer(self, block, planes, blocks, stride=1):
      downsample = None
      if stride != 1 or self.inplanes != planes * block.expansion:
        downsample = nn.Sequential(
          conv1x1(self.inplanes * 3, planes * block.expansion, stride),
          nn.BatchNorm2d(planes * block.expansion),
        )
      layers = [
        block(
          self.inplanes * 3,
          planes,
          stride,
          downsample,
          self.groups,
          self.base_width,
          self.dilation,
          self._norm_layer,
        )
      ]
      self.inplanes = planes * block.expansion
      for _ in range(1, blocks):
        layers.append(block(self.inplanes, planes, groups=self.groups, base_width=self.base_width))
      return nn.Sequential(*layers)

    def forward(self, x):
      l1 = self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x[0]))))))
      l2 = self.relu(self.bn3(self.conv3(x[1])))
      feature = torch.cat([l1, l2, x[2]], 1)
      return self.bn_layer(feature).contiguous()

  # --------------------------------------------------------------------------- decoder

  class DeBasicBlock(nn.Module):
    """RD4AD ``de_resnet.py:BasicBlock``."""

    expansion = 1

    def __init__(self, inplanes, planes, stride=1, upsample=None, groups=1, base_width=64):
      super().__init__()
      self.conv1 = deconv2x2(inplanes, planes, stride) if stride == 2 else conv3x3(inplanes, planes)
      self.bn1 = nn.BatchNorm2d(planes)
      self.relu = nn.ReLU(inplace=True)
      self.conv2 = conv3x3(planes, planes)
      self.bn2 = nn.BatchNorm2d(planes)
      self.upsample = upsample

    def forward(self, x):
      identity = x
      out = self.relu(self.bn1(self.conv1(x)))
      out = self.bn2(self.conv2(out))
      if self.upsample is not None:
        identity = self.upsample(x)
      out += identity
      return self.relu(out)

  class DeBottleneck(nn.Module):
    """RD4AD ``de_resnet.py:Bottleneck``."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1, upsample=None, groups=1, base_width=64):
      super().__init__()
      width = int(planes * (base_width / 64.0)) * groups
      self.conv1 = conv1x1(inplanes, width)
      self.bn1 = nn.BatchNorm2d(width)
      self.conv2 = deconv2x2(width, width, stride) if stride == 2 else conv3x3(width, width)
      self.bn2 = nn.BatchNorm2d(width)
      self.conv3 = conv1x1(width, planes * self.expansion)
      self.bn3 = nn.BatchNorm2d(planes * self.expansion)
      self.relu = nn.ReLU(inplace=True)
      self.upsample = upsample

    def forward(self, x):
      identity = x
      out = self.relu(self.bn1(self.conv1(x)))
      out = self.relu(self.bn2(self.conv2(out)))
      out = self.bn3(self.conv3(out))
      if self.upsample is not None:
        identity = self.upsample(x)
      out += identity
      return self.relu(out)

  class Decoder(nn.Module):
    """RD4AD ``de_resnet.py:ResNet`` (three stages) with SK-RD4AD's ``forward(x, y, res)``."""

    def __init__(self, block, layers, width_per_group=64):
      super().__init__()
      self.groups = 1
      self.base_width = width_per_group
      self.inplanes = 512 * block.expansion
      self.relu = nn.ReLU(inplace=True)  # SK-RD4AD's addition
      self.layer1 = self._make_layer(block, 256, layers[0], stride=2)
      self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
      self.layer3 = self._make_layer(block, 64, layers[2], stride=2)
      _official_init(self)

    def _make_layer(self, block, planes, blocks, stride=1):
      upsample = None
      if stride != 1 or self.inplanes != planes * block.expansion:
        upsample = nn.Sequential(
          deconv2x2(self.inplanes, planes * block.expansion, stride),
          nn.BatchNorm2d(planes * block.expansion),
        )
      layers = [block(self.inplanes, planes, stride, upsample, self.groups, self.base_width)]
      self.inplanes = planes * block.expansion
      for _ in range(1, blocks):
        layers.append(block(self.inplanes, planes, groups=self.groups, base_width=self.base_width))
      return nn.Sequential(*layers)

    def forward(self, x, y=None, res=0):
      if res == 0:
        feature_a = self.layer1(x)
        feature_b = self.layer2(feature_a)
        feature_c = self.layer3(feature_b)
      else:
        feature_a = self.layer1(x)
        feature_b = self.layer2(self.relu(feature_a + y[2]))
        feature_c = self.layer3(self.relu(feature_b + y[1]))
      return [feature_c, feature_b, feature_a]

  class MRKDDecoder(Decoder):
    """MRKD ``de_resnet.py:ResNet``: the RD4AD chain, then masked generation per level."""

    def __init__(self, block, layers, width_per_group=64, mask_ratio=0.2):
      nn.Module.__init__(self)
      self.groups = 1
      self.base_width = width_per_group
      self.lambda_mgd = mask_ratio
      self.inplanes = 512 * block.expansion
      e = block.expansion
      self.conv1 = nn.Conv2d(512 * e, 128 * e, kernel_size=1, stride=1, bias=False)  # unused
      self.layer1 = self._make_layer(block, 256, layers[0], stride=2)
      self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
      self.layer3 = self._make_layer(block, 64, layers[2], stride=2)
      for index, c in ((1, 256 * e), (2, 128 * e), (3, 64 * e)):
        head = nn.Sequential(
          nn.Conv2d(c, c, kernel_size=3, padding=1),
          nn.ReLU(inplace=True),
          nn.Conv2d(c, c, kernel_size=3, padding=1),
        )
        setattr(self, f"generation{index}", head)
      _official_init(self)

    def forward(self, x, mask=True):
      feature_a = self.layer1(x)
      feature_b = self.layer2(feature_a)
      feature_c = self.layer3(feature_b)
      outs = []
      for feature, head in (
        (feature_a, self.generation1),
        (feature_b, self.generation2),
        (feature_c, self.generation3),
      ):
        if mask:
          n, _, h, w = feature.shape
          mat = torch.rand((n, 1, h, w))
          mat = torch.where(mat > 1 - self.lambda_mgd, 0, 1)
          feature = torch.mul(feature, mat)
        outs.append(head(feature))
      return [outs[2], outs[1], outs[0]]

  # --------------------------------------------------------------------------- URD

  class URDTeacher(nn.Module):
    """URD ``models/teacher.py:Teacher``: a torchvision ResNet as ``encoder``, layers 1-3."""

    def __init__(self, arch="resnet18"):
      super().__init__()
      self.encoder = getattr(torchvision.models, arch)(weights=None)

    def forward(self, x):
      e = self.encoder
      x = e.maxpool(e.relu(e.bn1(e.conv1(x))))
      a = e.layer1(x)
      b = e.layer2(a)
      return [a, b, e.layer3(b)]

  def _urd_init(m):
    if isinstance(m, (nn.Linear, nn.Conv2d)):
      nn.init.xavier_normal_(m.weight)

  class URDStudent(nn.Module):
    """URD ``models/student.py:Student`` with the teacher's ``channels`` as ``dims``.

    ``blocks`` are (OCBE block, decoder block), as ``block_class`` returns them.
    """

    def __init__(self, blocks, bn_layers, decoder_layers, channels, width_per_group=64):
      super().__init__()
      bn_block, decoder_block = blocks
      self.bn = BN_layer(bn_block, bn_layers, width_per_group)
      self.decoder = Decoder(decoder_block, decoder_layers, width_per_group)
      dims = list(channels)

      def seq(*mods):
        return nn.Sequential(*mods)

      self.fuse_skip = nn.ModuleList(
        [
          seq(
            nn.Conv2d(dims[i + 1] * 2, dims[i + 1], 3, 1, 1, bias=False),
            nn.BatchNorm2d(dims[i + 1]),
            nn.ReLU(inplace=True),
          )
          for i in range(2)
        ]
      )
      self.conv3x3_simattn = nn.ModuleList(
        [
          seq(
            nn.Conv2d(dims[i + 1], dims[i + 1], 3, 1, 1, bias=False),
            nn.BatchNorm2d(dims[i + 1]),
            nn.ReLU(inplace=True),
          )
          for i in range(2)
        ]
      )
      self.conv1x1_downsample_dim = nn.ModuleList(
        [
          seq(
            nn.Upsample(scale_factor=0.5, mode="bilinear"),
            nn.Conv2d(dims[i], dims[i + 1], 1, 1, bias=False),
            nn.BatchNorm2d(dims[i + 1]),
            nn.ReLU(inplace=True),
          )
          for i in range(2)
        ]
      )
      self.fuse_encoder = nn.ModuleList(
        [
          seq(
            nn.Conv2d(dims[i + 1], dims[i + 1], 3, 1, 1, bias=False),
            nn.BatchNorm2d(dims[i + 1]),
            nn.ReLU(inplace=True),
          )
          for i in range(2)
        ]
      )
      self.apply(_urd_init)

    def forward(self, x, skip=True, attn=True):
      fea = x
      x = self.bn(x)
      if skip is False:
        return self.decoder(x)
      if attn is False:
        return self.forward_decoder_gii(x, fea)
      return self.forward_decoder_wogii(x, fea)

    def forward_decoder_gii(self, x, fea):
      feature_a = self.decoder.layer1(x)
      with torch.no_grad():
        sim_a = torch.unsqueeze(F.cosine_similarity(feature_a.detach(), fea[2]), dim=1)
      f_encoder = self.conv1x1_downsample_dim[1](fea[1])
      f_encoder = self.fuse_encoder[1](fea[2] + f_encoder)
      f_b = self.fuse_skip[1](
        torch.cat(
          [feature_a, self.conv3x3_simattn[1](f_encoder * sim_a + feature_a * (1 - sim_a))], 1
        )
      )
      feature_b = self.decoder.layer2(f_b)
      with torch.no_grad():
        sim_b = torch.unsqueeze(F.cosine_similarity(feature_b.detach(), fea[1]), dim=1)
      f_encoder = self.conv1x1_downsample_dim[0](fea[0])
      f_encoder = self.fuse_encoder[0](fea[1] + f_encoder)
      f_c = self.fuse_skip[0](
        torch.cat(
          [feature_b, self.conv3x3_simattn[0](f_encoder * sim_b + feature_b * (1 - sim_b))], 1
        )
      )
      feature_c = self.decoder.layer3(f_c)
      return [feature_c, feature_b, feature_a]

    def forward_decoder_wogii(self, x, fea):
      feature_a = self.decoder.layer1(x)
      f_encoder = self.conv1x1_downsample_dim[1](fea[1])
      f_encoder = self.fuse_encoder[1](fea[2] + f_encoder)
      f_b = self.fuse_skip[1](torch.cat([feature_a, f_encoder], 1))
      feature_b = self.decoder.layer2(f_b)
      f_encoder = self.conv1x1_downsample_dim[0](fea[0])
      f_encoder = self.fuse_encoder[0](fea[1] + f_encoder)
      f_c = self.fuse_skip[0](torch.cat([feature_b, f_encoder], 1))
      feature_c = self.decoder.layer3(f_c)
      return [feature_c, feature_b, feature_a]

  # --------------------------------------------------------------------------- encoder

  class Encoder(nn.Module):
    """The frozen ImageNet encoder: a torchvision ResNet's layers 1-3 (RD4AD ``resnet.py``)."""

    def __init__(self, arch="resnet18"):
      super().__init__()
      self.model = getattr(torchvision.models, arch)(weights=None)

    def forward(self, x):
      m = self.model
      x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
      a = m.layer1(x)
      b = m.layer2(a)
      return [a, b, m.layer3(b)]


# ----------------------------------------------------------------------------- helpers


def block_class(block: str):
  """The official OCBE and decoder block classes for our ``StudentLayout.block``."""
  if block == "basic":
    return EncoderBasicBlock, DeBasicBlock
  return EncoderBottleneck, DeBottleneck


def randomize_batch_norm(module, generator=None) -> None:
  """Non-trivial BatchNorm affine parameters and running statistics, so a swapped
  field or a wrong running variance shows in every output."""
  with torch.no_grad():
    for m in module.modules():
      if isinstance(m, nn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5, generator=generator)
        m.bias.uniform_(-0.3, 0.3, generator=generator)
        m.running_mean.uniform_(-0.3, 0.3, generator=generator)
        m.running_var.uniform_(0.5, 2.0, generator=generator)
        m.num_batches_tracked.fill_(17)


def loss_fucntion(a, b):
  """RD4AD ``main.py:loss_fucntion`` (sic): flattened cosine per level, summed."""
  cos_loss = torch.nn.CosineSimilarity()
  loss = 0
  for item in range(len(a)):
    loss += torch.mean(
      1 - cos_loss(a[item].view(a[item].shape[0], -1), b[item].view(b[item].shape[0], -1))
    )
  return loss


def loss_function_2(a, b):
  """SK-RD4AD ``main.py:loss_function_2`` (the 32 / 64 px literals = E2's / E1's sizes)."""
  mse_loss = torch.nn.MSELoss()
  a2 = F.interpolate(a[2], size=a[1].shape[-1], mode="bilinear", align_corners=True)
  b2 = F.interpolate(b[2], size=a[1].shape[-1], mode="bilinear", align_corners=True)
  l2 = torch.mean(mse_loss(a2.view(a2.shape[0], -1), b2.view(b2.shape[0], -1)))
  l1 = torch.mean(mse_loss(a[1].view(a[1].shape[0], -1), b[1].view(b[1].shape[0], -1)))
  loss2_1 = torch.abs(l2 - l1)
  l0 = torch.mean(mse_loss(a[0].view(a[0].shape[0], -1), b[0].view(b[0].shape[0], -1)))
  a1 = F.interpolate(a[1], size=a[0].shape[-1], mode="bilinear", align_corners=True)
  b1 = F.interpolate(b[1], size=a[0].shape[-1], mode="bilinear", align_corners=True)
  l1 = torch.mean(mse_loss(a1.view(a1.shape[0], -1), b1.view(b1.shape[0], -1)))
  loss2_2 = torch.abs(l1 - l0)
  return loss2_1 + loss2_2


def loss_function(a, b, L2=0):  # noqa: N803 (the official argument name)
  """SK-RD4AD ``main.py:loss_function``: (main loss, consistency loss)."""
  cos_loss = torch.nn.CosineSimilarity()
  loss = 0
  if L2 == 0:
    for item in range(len(a)):
      loss += torch.mean(
        1 - cos_loss(a[item].view(a[item].shape[0], -1), b[item].view(b[item].shape[0], -1))
      )
  return loss, loss_function_2(a, b)


def cal_anomaly_map(fs_list, ft_list, out_size, amap_mode="a"):
  """RD4AD ``test.py:cal_anomaly_map`` for one image (batch 1), as ``evaluation`` calls it."""
  anomaly_map = (
    np.ones([out_size, out_size]) if amap_mode == "mul" else np.zeros([out_size, out_size])
  )
  for fs, ft in zip(fs_list, ft_list):
    a_map = 1 - F.cosine_similarity(fs, ft)
    a_map = torch.unsqueeze(a_map, dim=1)
    a_map = F.interpolate(a_map, size=out_size, mode="bilinear", align_corners=True)
    a_map = a_map[0, 0, :, :].to("cpu").detach().numpy()
    if amap_mode == "mul":
      anomaly_map *= a_map
    else:
      anomaly_map += a_map
  return anomaly_map


def official_maps(teacher_feats, student_feats, out_size):
  """RD4AD ``test.py:evaluation``'s maps and image scores, image by image.

  Returns:
    (maps [B, out, out] float64 after ``gaussian_filter(sigma=4)``, scores [B] = max).
  """
  maps = []
  for i in range(teacher_feats[0].shape[0]):
    amap = cal_anomaly_map(
      [t[i : i + 1] for t in teacher_feats], [s[i : i + 1] for s in student_feats], out_size
    )
    maps.append(gaussian_filter(amap, sigma=4))
  maps = np.stack(maps)
  return maps, maps.max(axis=(1, 2))


def official_models(
  method: str, layout, arch: str = "resnet18", seed: int = 0, randomize: bool = True
) -> dict:
  """The official trainable modules of ``method`` for our ``StudentLayout``.

  Every BatchNorm gets random affine parameters and running statistics
  (``randomize_batch_norm``) unless ``randomize`` is False (meta tensors).
  Returns the modules by the names the official script saves them under:
  ``{'bn', 'decoder'}`` or ``{'teacher', 'student'}`` (URD's teacher is
  ``arch`` from torchvision).
  """
  torch.manual_seed(seed)
  generator = torch.Generator().manual_seed(seed + 1)
  blocks = block_class(layout.block)
  if method == "rd_expert":
    models = {
      "teacher": URDTeacher(arch),
      "student": URDStudent(
        blocks,
        layout.oce_blocks,
        layout.decoder_blocks,
        layout.channels,
        layout.bottleneck_width_per_group,
      ),
    }
  else:
    decoder_cls = MRKDDecoder if method == "mrkd" else Decoder
    models = {
      "bn": BN_layer(blocks[0], layout.oce_blocks, layout.bottleneck_width_per_group),
      "decoder": decoder_cls(blocks[1], layout.decoder_blocks, layout.decoder_width_per_group),
    }
  if randomize:
    for module in models.values():
      randomize_batch_norm(module, generator)
  return models


def random_encoder(arch: str = "resnet18", seed: int = 0) -> Encoder:
  """A frozen torchvision encoder (eval mode) with random weights and BatchNorm statistics."""
  torch.manual_seed(seed)
  encoder = Encoder(arch)
  randomize_batch_norm(encoder, torch.Generator().manual_seed(seed + 1))
  return encoder.eval()
