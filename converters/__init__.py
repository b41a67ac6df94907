"""DICOM series, volumes, masks and RTSTRUCTs in and out; knows nothing of the network or database."""
import pydicom

# Clinical images often break VR length rules (e.g. a 17-character Study ID); reading must not warn
# on every file. What we write is validated instead (converters.rtstruct_write).
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
