"""fedmpi: MPI-based federated brain-age training with FedSparsify."""
from setuptools import find_packages, setup

setup(
    name="fedmpi",
    version="0.1.0",
    description="MPI federated trainer for neuroimaging with progressive pruning (FedSparsify)",
    packages=find_packages(include=["fedmpi", "fedmpi.*", "preprocess", "preprocess.*"]),
    python_requires=">=3.9",
    install_requires=[
        # torch is installed first by `make setup` (CPU wheel) or by the user (CUDA build);
        # a loose range here never replaces it.
        "torch>=2.1",
        "mpi4py>=4,<5",
        "numpy>=1.24",
        "h5py>=3.8",
        "nibabel>=5",
        "nilearn>=0.10",  # ships the MNI152 templates; resampling
        "scipy>=1.10",  # ndimage for the synthetic cohort (already a nilearn dependency)
        "tqdm>=4.60",
        "pyyaml>=6",  # the experiment configs in jobs/configs are YAML
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-mpi>=0.6"],
        # Local MPI for workstations and CI; on clusters use the site's MPI module instead.
        "mpich": ["mpich"],
        "report": ["matplotlib>=3.6"],
        # `nifti --register/--skull-strip` for scanner-space T1s (docs/registration.md). antspyx: ANTs
        # registration as a wheel, no compiler or ANTs install (it pins numpy<2.4, scipy<1.16);
        # deepbet: brain extraction whose weights ship in its wheel and run on the torch we already need.
        "register": ["antspyx>=0.5", "deepbet>=1.0"],
    },
    entry_points={"console_scripts": ["fedmpi=fedmpi.cli:main", "fedmpi-preprocess=preprocess.cli:main"]},
)
