"""idforge.models"""
