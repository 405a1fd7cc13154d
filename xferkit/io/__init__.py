"""Reading what users give xferkit: image files, labelled folders and CSVs, and writing files safely."""
