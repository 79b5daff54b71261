"""MRI preprocessing: synthetic cohort, NIfTI to HDF5, federated splits."""
