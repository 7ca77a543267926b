"""idforge.train"""
