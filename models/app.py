"""The main application's tables, mapped exactly as Prisma creates them.

The worker does not own these tables and never changes their DDL: names are
Prisma's (model name or @@map, quoted camelCase columns). Prisma timestamps
are `TIMESTAMP(3)` without time zone and hold UTC. Prisma fills `updatedAt`
in its client, so the worker sets it on every row it changes.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from sqlalchemy import ARRAY, BigInteger, Boolean, DateTime, ForeignKey, Integer, Numeric, Text
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base

TS = DateTime(timezone=False)


class Tenant(Base):
    __tablename__ = "Tenant"
    __table_args__ = {"schema": "public"}

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(Text)
    slug: Mapped[str] = mapped_column(Text, unique=True)
    createdAt: Mapped[datetime] = mapped_column(TS)
    updatedAt: Mapped[datetime] = mapped_column(TS)
    deletedAt: Mapped[datetime | None] = mapped_column(TS)


class User(Base):
    __tablename__ = "User"
    __table_args__ = {"schema": "public"}

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    email: Mapped[str] = mapped_column(Text, unique=True)
    name: Mapped[str | None] = mapped_column(Text)
    entitlements: Mapped[list[str] | None] = mapped_column(ARRAY(Text))
    stripeCustomerId: Mapped[str | None] = mapped_column(Text, unique=True)
    createdAt: Mapped[datetime] = mapped_column(TS)
    updatedAt: Mapped[datetime] = mapped_column(TS)
    deletedAt: Mapped[datetime | None] = mapped_column(TS)


class Invoice(Base):
    __tablename__ = "Invoice"
    __table_args__ = {"schema": "public"}

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenantId: Mapped[int | None] = mapped_column(ForeignKey("public.Tenant.id"))
    invoiceNumber: Mapped[str] = mapped_column(Text, unique=True)
    status: Mapped[str] = mapped_column(Text)
    amountCents: Mapped[int] = mapped_column(BigInteger)
    amountPaidCents: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(Text)
    dueAt: Mapped[datetime | None] = mapped_column(TS)
    issuedAt: Mapped[datetime | None] = mapped_column(TS)
    paidAt: Mapped[datetime | None] = mapped_column(TS)
    voidedAt: Mapped[datetime | None] = mapped_column(TS)
    stripeInvoiceId: Mapped[str | None] = mapped_column(Text, unique=True)
    stripePaymentIntentId: Mapped[str | None] = mapped_column(Text, unique=True)
    stripeChargeId: Mapped[str | None] = mapped_column(Text, unique=True)
    isMarketplaceInvoice: Mapped[bool] = mapped_column(Boolean)
    marketplaceInvoiceType: Mapped[str | None] = mapped_column(Text)
    clientUserId: Mapped[str | None] = mapped_column(ForeignKey("public.User.id"))
    marketplaceProviderId: Mapped[int | None] = mapped_column(ForeignKey("marketplace.providers.id"))
    marketplaceListingId: Mapped[int | None] = mapped_column(
        ForeignKey("marketplace.service_listings.id")
    )
    description: Mapped[str | None] = mapped_column(Text)
    createdAt: Mapped[datetime] = mapped_column(TS)
    updatedAt: Mapped[datetime] = mapped_column(TS)
    deletedAt: Mapped[datetime | None] = mapped_column(TS)


class MessageThread(Base):
    __tablename__ = "MessageThread"
    __table_args__ = {"schema": "public"}

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    subject: Mapped[str | None] = mapped_column(Text)
    creatorId: Mapped[str] = mapped_column(ForeignKey("public.User.id"))
    listingId: Mapped[int | None] = mapped_column(ForeignKey("marketplace.service_listings.id"))
    createdAt: Mapped[datetime] = mapped_column(TS)
    updatedAt: Mapped[datetime] = mapped_column(TS)
    deletedAt: Mapped[datetime | None] = mapped_column(TS)


class Message(Base):
    __tablename__ = "Message"
    __table_args__ = {"schema": "public"}

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    threadId: Mapped[int] = mapped_column(ForeignKey("public.MessageThread.id"))
    senderId: Mapped[str] = mapped_column(ForeignKey("public.User.id"))
    body: Mapped[str] = mapped_column(Text)
    createdAt: Mapped[datetime] = mapped_column(TS)
    deletedAt: Mapped[datetime | None] = mapped_column(TS)


class Provider(Base):
    __tablename__ = "providers"
    __table_args__ = {"schema": "marketplace"}

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    userId: Mapped[str] = mapped_column(ForeignKey("public.User.id"), unique=True)
    tenantId: Mapped[int | None] = mapped_column(ForeignKey("public.Tenant.id"))
    providerType: Mapped[str] = mapped_column(Text)
    businessName: Mapped[str] = mapped_column(Text)
    businessDescription: Mapped[str | None] = mapped_column(Text)
    city: Mapped[str | None] = mapped_column(Text)
    state: Mapped[str | None] = mapped_column(Text)
    stripeConnectAccountId: Mapped[str | None] = mapped_column(Text, unique=True)
    stripeConnectOnboardingComplete: Mapped[bool] = mapped_column(Boolean)
    stripeConnectPayoutsEnabled: Mapped[bool] = mapped_column(Boolean)
    paymentMode: Mapped[str] = mapped_column(Text)
    paymentInstructions: Mapped[str | None] = mapped_column(Text)
    totalListings: Mapped[int] = mapped_column(Integer)
    totalTransactions: Mapped[int] = mapped_column(Integer)
    totalRevenueCents: Mapped[int] = mapped_column(BigInteger)
    averageRating: Mapped[Decimal] = mapped_column(Numeric(3, 2))
    status: Mapped[str] = mapped_column(Text)
    createdAt: Mapped[datetime] = mapped_column(TS)
    updatedAt: Mapped[datetime] = mapped_column(TS)


class ServiceListing(Base):
    __tablename__ = "service_listings"
    __table_args__ = {"schema": "marketplace"}

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    providerId: Mapped[int] = mapped_column(ForeignKey("marketplace.providers.id"))
    title: Mapped[str] = mapped_column(Text)
    description: Mapped[str | None] = mapped_column(Text)
    category: Mapped[str] = mapped_column(Text)
    priceCents: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(Text)
    createdAt: Mapped[datetime] = mapped_column(TS)
    updatedAt: Mapped[datetime] = mapped_column(TS)
    deletedAt: Mapped[datetime | None] = mapped_column(TS)


class Transaction(Base):
    __tablename__ = "transactions"
    __table_args__ = {"schema": "marketplace"}

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    clientUserId: Mapped[str] = mapped_column(ForeignKey("public.User.id"))
    providerId: Mapped[int] = mapped_column(ForeignKey("marketplace.providers.id"))
    listingId: Mapped[int | None] = mapped_column(ForeignKey("marketplace.service_listings.id"))
    invoiceType: Mapped[str] = mapped_column(Text)
    tenantId: Mapped[int | None] = mapped_column(Integer)
    invoiceId: Mapped[int] = mapped_column(ForeignKey("public.Invoice.id"))
    serviceDescription: Mapped[str] = mapped_column(Text)
    totalCents: Mapped[int] = mapped_column(BigInteger)
    platformFeeCents: Mapped[int] = mapped_column(BigInteger)
    providerPayoutCents: Mapped[int | None] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(Text)
    createdAt: Mapped[datetime] = mapped_column(TS)
    invoicedAt: Mapped[datetime | None] = mapped_column(TS)
    paidAt: Mapped[datetime | None] = mapped_column(TS)
    completedAt: Mapped[datetime | None] = mapped_column(TS)


class Review(Base):
    __tablename__ = "reviews"
    __table_args__ = {"schema": "marketplace"}

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    transactionId: Mapped[int] = mapped_column(
        ForeignKey("marketplace.transactions.id"), unique=True
    )
    providerId: Mapped[int] = mapped_column(ForeignKey("marketplace.providers.id"))
    reviewerUserId: Mapped[str] = mapped_column(ForeignKey("public.User.id"))
    rating: Mapped[int] = mapped_column(Integer)
    comment: Mapped[str | None] = mapped_column(Text)
    createdAt: Mapped[datetime] = mapped_column(TS)
    deletedAt: Mapped[datetime | None] = mapped_column(TS)
