"""lmforge.model"""
