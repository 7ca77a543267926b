"""idforge.data_pipeline"""
